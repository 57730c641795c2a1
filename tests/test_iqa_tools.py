"""tools/iqa_to_csv.py on small files generated in each publisher's format: KonIQ-10k,
SPAQ (.xlsx), TID2013, KADID-10k and LIVE in the Wild (.mat)."""
import csv
import math
import zipfile

import numpy as np
import pytest
from scipy.io import savemat

from dataset.labels import read_label_csv
from dataset.maxent import moments, std_bounds
from dataset.mos import read_mos_csv, to_bins
from tools import iqa_to_csv


def read(path):
    return list(csv.reader(open(path)))


def convert(capsys, *argv):
    code = iqa_to_csv.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def outputs(folder, header=True):
    """{split: [rows]} of the three written files (header dropped)."""
    return {s: read(folder / f"{s}_labels.csv")[1 if header else 0:] for s in ("train", "val", "test")}


def koniq_csv(path, n=40, with_sets=False):
    rng = np.random.default_rng(0)
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"] + (["set"] if with_sets else [])
    rows, truth = [header], {}
    for k in range(n):
        votes = rng.integers(0, 30, 5)
        mean = float((votes * np.arange(1, 6)).sum() / votes.sum())
        sd = float(np.sqrt((votes * (np.arange(1, 6) - mean) ** 2).sum() / votes.sum()))
        name = f"{1000000 + k}.jpg"
        truth[name] = (mean, sd)
        sets = [["training", "validation", "test"][k % 3]] if with_sets else []
        rows.append([name, *map(str, votes), str(votes.sum()), repr(mean), repr(sd), "50.0", *sets])
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return truth


def test_koniq10k_random_split_and_official_split(tmp_path, capsys):
    truth = koniq_csv(tmp_path / "koniq10k_scores_and_distributions.csv")
    code, out, _ = convert(capsys, "--dataset", "koniq10k", "--src", tmp_path / "koniq10k_scores_and_distributions.csv",
                           "--out_dir", tmp_path / "out")
    assert code == 0 and "score range 1..5" in out and "--label_format mos --score_range 1 5" in out
    assert read(tmp_path / "out" / "train_labels.csv")[0] == ["image_id", "mos", "std"]
    splits = outputs(tmp_path / "out")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [28, 4, 8]  # 70/10/20 of 40
    for rows in splits.values():
        for name, mos, std in rows:
            assert (float(mos), float(std)) == truth[name]  # written exactly (repr round-trips)
    # The file that carries KonIQ's `set` column: its split, not a random one.
    koniq_csv(tmp_path / "koniq10k_distributions_sets.csv", n=9, with_sets=True)
    code, out, _ = convert(capsys, "--dataset", "koniq10k", "--src", tmp_path / "koniq10k_distributions_sets.csv",
                           "--out_dir", tmp_path / "sets")
    assert code == 0 and "(the official split)" in out
    assert [r[0] for r in outputs(tmp_path / "sets")["val"]] == ["1000001.jpg", "1000004.jpg", "1000007.jpg"]


def write_xlsx(path, rows):
    """A minimal workbook as spreadsheet programs write it: shared strings for text, numbers inline."""
    strings, sheet_rows = [], []
    for r, cells in enumerate(rows, start=1):
        xml = []
        for c, value in enumerate(cells):
            ref = f"{chr(65 + c)}{r}"
            if isinstance(value, str):
                strings.append(value)
                xml.append(f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>')
            else:
                xml.append(f'<c r="{ref}"><v>{value!r}</v></c>')
        sheet_rows.append(f'<row r="{r}">{"".join(xml)}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        z.writestr("xl/workbook.xml", f'<?xml version="1.0"?><workbook {ns}><sheets><sheet name="Sheet1" sheetId="1"/></sheets></workbook>')
        z.writestr("xl/sharedStrings.xml", f'<?xml version="1.0"?><sst {ns}>' + "".join(f"<si><t>{s}</t></si>" for s in strings) + "</sst>")
        z.writestr("xl/worksheets/sheet1.xml", f'<?xml version="1.0"?><worksheet {ns}><sheetData>{"".join(sheet_rows)}</sheetData></worksheet>')


def test_spaq_xlsx_has_no_std(tmp_path, capsys):
    rows = [["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]]
    rows += [[f"{k:05d}.jpg", 10.0 + k * 8.5, 50.0, 50.0, 50.0, 50.0, 50.0] for k in range(1, 11)]
    write_xlsx(tmp_path / "MOS and Image attribute scores.xlsx", rows)
    code, out, _ = convert(capsys, "--dataset", "spaq", "--src", tmp_path / "MOS and Image attribute scores.xlsx",
                           "--out_dir", tmp_path / "out", "--seed", "3")
    assert code == 0 and "--score_range 0 100" in out
    assert read(tmp_path / "out" / "test_labels.csv")[0] == ["image_id", "mos"]
    got = {r[0]: float(r[1]) for rows in outputs(tmp_path / "out").values() for r in rows}
    assert got == {f"{k:05d}.jpg": 10.0 + k * 8.5 for k in range(1, 11)}
    # The sheet saved as CSV works alike; a MOS above 100 is reported with its row.
    (tmp_path / "spaq.csv").write_text("Image name,MOS\n00001.jpg,42\n00002.jpg,142\n")
    code, _, err = convert(capsys, "--dataset", "spaq", "--src", tmp_path / "spaq.csv", "--out_dir", tmp_path / "bad")
    assert code == 2 and "spaq.csv:3, column 2: MOS 142 is outside 0..100" in err


def tid2013_files(folder, refs=6, per_ref=4):
    rng = np.random.default_rng(2)
    mos_lines, std_lines, truth = [], [], {}
    for r in range(1, refs + 1):
        for d in range(1, per_ref + 1):
            name = f"i{r:02d}_{d:02d}_1.bmp"
            mos, std = round(float(rng.uniform(0.5, 8.5)), 5), round(float(rng.uniform(0.3, 1.5)), 5)
            truth[name] = (mos, std)
            mos_lines.append(f"{mos} {name}")
            std_lines.append(f"{std}")
    (folder / "mos_with_names.txt").write_text("\r\n".join(mos_lines) + "\r\n")  # as distributed: CRLF
    (folder / "mos_std.txt").write_text("\r\n".join(std_lines) + "\r\n")
    return truth


def test_tid2013_keeps_each_reference_photo_in_one_split(tmp_path, capsys):
    truth = tid2013_files(tmp_path)
    code, out, _ = convert(capsys, "--dataset", "tid2013", "--src", tmp_path / "mos_with_names.txt", tmp_path / "mos_std.txt",
                           "--out_dir", tmp_path / "out", "--val_fraction", "0.2", "--test_fraction", "0.2")
    assert code == 0 and "--score_range 0 9" in out
    splits = outputs(tmp_path / "out")
    refs = {s: {r[0][:3] for r in rows} for s, rows in splits.items()}
    assert not (refs["train"] & refs["val"] or refs["train"] & refs["test"] or refs["val"] & refs["test"])
    assert [len(refs[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert {r[0]: (float(r[1]), float(r[2])) for rows in splits.values() for r in rows} == truth
    # The 10-bin targets instead: distributions whose mean and std are the MOS's, mapped onto 1..10.
    code, out, _ = convert(capsys, "--dataset", "tid2013", "--src", tmp_path / "mos_with_names.txt", tmp_path / "mos_std.txt",
                           "--out_dir", tmp_path / "dist", "--as_distributions")
    assert code == 0
    clipped = 0
    for rows in outputs(tmp_path / "dist", header=False).values():
        for row in rows:
            p = np.array([float(x) for x in row[1:]])
            assert len(p) == 10 and abs(p.sum() - 1) < 1e-6
            mean, std = moments(p[None])
            target_mean, target_std = to_bins(truth[row[0]][0], (0, 9)), truth[row[0]][1]  # 0..9 onto 1..10: same unit
            low, high = std_bounds(target_mean, 10)
            assert mean[0] == pytest.approx(target_mean, abs=1e-6)
            assert std[0] == pytest.approx(min(max(target_std, low), high), abs=1e-6)  # the closest reachable std
            clipped += not low <= target_std <= high
    assert clipped > 0 and f"{clipped} images have a std that 10 bins cannot reach" in out
    # A std file that does not match the MOS file line for line is refused.
    (tmp_path / "short.txt").write_text("0.5\n")
    code, _, err = convert(capsys, "--dataset", "tid2013", "--src", tmp_path / "mos_with_names.txt", tmp_path / "short.txt",
                           "--out_dir", tmp_path / "bad")
    assert code == 2 and "1 stds for the 24 MOS lines" in err


def test_kadid10k_std_from_variance_and_reference_groups(tmp_path, capsys):
    lines = ["dist_img,ref_img,dmos,var"]
    truth = {}
    for r in range(1, 11):
        for d in range(1, 4):
            name, var = f"I{r:02d}_{d:02d}_01.png", 0.25 + 0.01 * d
            truth[name] = (1 + 0.4 * r - 0.1 * d, math.sqrt(var))
            lines.append(f"{name},I{r:02d}.png,{truth[name][0]!r},{var!r}")
    (tmp_path / "dmos.csv").write_text("\n".join(lines) + "\n")
    code, out, _ = convert(capsys, "--dataset", "kadid10k", "--src", tmp_path / "dmos.csv", "--out_dir", tmp_path / "out")
    assert code == 0 and "--score_range 1 5" in out
    splits = outputs(tmp_path / "out")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [21, 3, 6]  # 7/1/2 of the 10 reference photos
    for rows in splits.values():
        for name, mos, std in rows:
            assert float(mos) == truth[name][0] and float(std) == pytest.approx(truth[name][1], abs=1e-12)
    # Readable as MOS labels by main.py's reader (the images need not exist for this check).
    table = read_mos_csv(tmp_path / "out" / "train_labels.csv", tmp_path, (1, 5), require_images=False)
    assert len(table) == 21 and table.std is not None
    (tmp_path / "wrong.csv").write_text("image,score\na.png,3\n")
    code, _, err = convert(capsys, "--dataset", "kadid10k", "--src", tmp_path / "wrong.csv", "--out_dir", tmp_path / "bad")
    assert code == 2 and "no column 'dist_img', 'dmos'" in err


def test_live_in_the_wild_mat_files_without_the_practice_images(tmp_path, capsys):
    n = 1169
    names = np.empty((n, 1), dtype=object)
    for k in range(n):
        names[k, 0] = f"t{k + 1}.bmp" if k < 7 else f"{k + 3}.JPG"
    rng = np.random.default_rng(4)
    mos, std = rng.uniform(20, 80, (1, n)), rng.uniform(7, 15, (1, n))  # stds 10 bins reach at these means
    savemat(tmp_path / "AllImages_release.mat", {"AllImages_release": names})
    savemat(tmp_path / "AllMOS_release.mat", {"AllMOS_release": mos})
    savemat(tmp_path / "AllStdDev_release.mat", {"AllStdDev_release": std})
    # Any order of the three files.
    code, out, _ = convert(capsys, "--dataset", "clive", "--src", tmp_path / "AllStdDev_release.mat",
                           tmp_path / "AllImages_release.mat", tmp_path / "AllMOS_release.mat", "--out_dir", tmp_path / "out",
                           "--as_distributions")
    assert code == 0 and "1162 images" in out and "score range 0..100" in out
    rows = [r for rows in outputs(tmp_path / "out", header=False).values() for r in rows]
    assert len(rows) == 1162 and not any(r[0].startswith("t") for r in rows)
    expected = {f"{k + 3}.JPG": (mos[0, k], std[0, k]) for k in range(7, n)}
    p = np.array([[float(x) for x in r[1:]] for r in rows])
    mean, got_std = moments(p)
    assert mean == pytest.approx([to_bins(expected[r[0]][0], (0, 100)) for r in rows], abs=1e-6)
    assert got_std == pytest.approx([expected[r[0]][1] * 9 / 100 for r in rows], abs=1e-6)
    table = read_label_csv(tmp_path / "out" / "test_labels.csv", tmp_path, require_images=False)
    assert table.dists.shape == (len(table), 10)
    code, _, err = convert(capsys, "--dataset", "clive", "--src", tmp_path / "AllMOS_release.mat", "--out_dir", tmp_path / "bad")
    assert code == 2 and "takes 3 --src files" in err
