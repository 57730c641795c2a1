"""tools/ava_to_csv.py on a generated AVA.txt with missing, corrupt and zero-vote entries."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from dataset.labels import read_label_csv
from tools import ava_to_csv

GOOD = [str(1001 + k) for k in range(20)]
NON_IMAGE, ZERO_BYTE, TRUNCATED, ZERO_VOTES = "1021", "1022", "1023", "1024"
MISSING = ["2001", "2002"]
ALL_IDS = GOOD[:10] + [NON_IMAGE, MISSING[0], ZERO_BYTE] + GOOD[10:] + [TRUNCATED, ZERO_VOTES, MISSING[1]]


def run(argv):
    return ava_to_csv.main(ava_to_csv.get_args_parser().parse_args([str(a) for a in argv]))


def votes_of(image_id):
    if image_id == ZERO_VOTES:
        return [0] * 10
    rng = np.random.default_rng(int(image_id))
    return np.bincount(np.clip(rng.normal(5.5, 1.5, 200).round(), 1, 10).astype(int), minlength=11)[1:].tolist()


@pytest.fixture(scope="module")
def ava(tmp_path_factory):
    """An AVA.txt (15 columns) and its image folder with planted problems."""
    root = tmp_path_factory.mktemp("ava")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in GOOD + [ZERO_VOTES, TRUNCATED, "9999"]:  # 9999: an image AVA.txt does not name
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
    payload = (images / f"{TRUNCATED}.jpg").read_bytes()
    (images / f"{TRUNCATED}.jpg").write_bytes(payload[:len(payload) // 2])
    (images / f"{NON_IMAGE}.jpg").write_text("<html>404</html>")
    (images / f"{ZERO_BYTE}.jpg").write_bytes(b"")
    lines = [" ".join(map(str, [n, image_id, *votes_of(image_id), n % 7, 0, 1396]))
             for n, image_id in enumerate(ALL_IDS, start=1)]
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")
    return root


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def read_splits(out):
    splits = {name: read_rows(out / f"{name}_labels.csv") for name in ("train", "val", "test")}
    rejected = read_rows(out / "rejected.csv")
    assert rejected[0] == ["image_id", "reason"]
    return splits, {image_id: reason for image_id, reason in rejected[1:]}


def check_partition(splits, rejected, usable):
    ids = {name: [row[0] for row in rows] for name, rows in splits.items()}
    everything = ids["train"] + ids["val"] + ids["test"] + list(rejected)
    assert sorted(everything) == sorted(ALL_IDS)  # disjoint, and nothing lost or added
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(usable)
    for rows in splits.values():  # reference format: no header, id and 10 fractions of the votes
        assert [row[0] for row in rows] == [i for i in ALL_IDS if i in {r[0] for r in rows}]  # AVA.txt order
        for row in rows:
            assert len(row) == 11
            counts = np.array(votes_of(row[0]), dtype=float)
            np.testing.assert_allclose([float(v) for v in row[1:]], counts / counts.sum(), rtol=1e-5)
    return ids


def test_test_list_split_exact_contents_and_rejects(ava, tmp_path, capsys):
    test_list = tmp_path / "generic_test.jpgl"
    test_list.write_text(f"1001\n1002.jpg\n1015\n{NON_IMAGE}\n5555\n")  # 1021 rejected; 5555 not in AVA.txt
    out = tmp_path / "out"
    assert run(["--ava_txt", ava / "AVA.txt", "--img_path", ava / "images", "--out_dir", out, "--test_list", test_list,
                "--val_size", "4", "--seed", "5", "--workers", "2", "--quiet"]) == 0
    splits, rejected = read_splits(out)
    assert rejected == {NON_IMAGE: "unreadable: not an image Pillow can identify",
                        MISSING[0]: f"missing: no image file for this id in {ava / 'images'}",
                        ZERO_BYTE: "unreadable: zero-byte file",
                        ZERO_VOTES: "zero votes",
                        MISSING[1]: f"missing: no image file for this id in {ava / 'images'}"}
    assert list(rejected) == [NON_IMAGE, MISSING[0], ZERO_BYTE, ZERO_VOTES, MISSING[1]]  # AVA.txt order
    # The header check passes a JPEG cut after its header (only --full_decode finds it).
    ids = check_partition(splits, rejected, GOOD + [TRUNCATED])
    assert ids["test"] == ["1001", "1002", "1015"]
    assert len(ids["val"]) == 4 and set(ids["val"]) <= set(GOOD + [TRUNCATED]) - {"1001", "1002", "1015"}
    captured = capsys.readouterr()
    assert "1 id of --test_list is not in" in captured.err and "5555" in captured.err
    assert "26 entries" in captured.out
    assert "rejected 5 (2 missing, 2 unreadable, 1 zero votes)" in captured.out
    assert "train 14, val 4, test 3" in captured.out
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "train_labels.csv").stat().st_mode & 0o777 == 0o666 & ~umask  # not private like a temp file
    # The project's own reader takes the files as they are, every row.
    assert len(read_label_csv(out / "train_labels.csv", ava / "images")) == 14


def test_random_split_with_full_decode_is_reproducible(ava, tmp_path):
    def convert(out, seed):
        assert run(["--ava_txt", ava / "AVA.txt", "--img_path", ava / "images", "--out_dir", out, "--val_size", "3",
                    "--test_size", "5", "--seed", seed, "--full_decode", "--workers", "2", "--quiet"]) == 0
        return read_splits(out)

    splits, rejected = convert(tmp_path / "a", 1)
    assert rejected[TRUNCATED] == "unreadable: truncated image"
    ids = check_partition(splits, rejected, GOOD)
    assert [len(ids[n]) for n in ("train", "val", "test")] == [12, 3, 5]
    again, _ = convert(tmp_path / "b", 1)
    assert again == splits
    other, _ = convert(tmp_path / "c", 2)
    assert other != splits


def test_default_sizes_follow_the_reference_split():
    sizes = {name: len(ids) for name, ids in ava_to_csv.split_ids([str(i) for i in range(255_490)], seed=0).items()}
    assert sizes == {"train": 229_981, "val": 12_691, "test": 12_818}
    sizes = {name: len(ids) for name, ids in ava_to_csv.split_ids(list(range(1000)), seed=0).items()}
    assert sizes == {"train": 900, "val": 50, "test": 50}


def test_malformed_ava_txt_reports_every_line_and_exits_2(ava, tmp_path, capsys):
    lines = (ava / "AVA.txt").read_text().splitlines()
    bad = list(lines[:6])
    bad[1] = " ".join(bad[1].split()[:14])                                  # line 2: 14 columns
    cells = bad[2].split()
    bad[2] = " ".join(cells[:4] + ["many"] + cells[5:])                    # line 3: column 5 not a number
    cells = bad[3].split()
    bad[3] = " ".join(cells[:2] + ["-3"] + cells[3:])                      # line 4: negative votes
    bad[5] = " ".join(["6", lines[0].split()[1]] + bad[5].split()[2:])   # line 6: duplicate id
    ava_txt = tmp_path / "AVA.txt"
    ava_txt.write_text("\n".join(bad) + "\n")
    out = tmp_path / "out"
    assert run(["--ava_txt", ava_txt, "--img_path", ava / "images", "--out_dir", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err
    for expected in (":2: has 14 columns, expected 15", ":3, column 5: 'many' is not an integer",
                     ":4, column 3: negative vote count -3", f":6, column 2: duplicate image id '{GOOD[0]}' (first on line 1)"):
        assert f"{ava_txt}{expected}" in err, expected
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--test_size", "3", "--test_list", "x.txt"], "exclude each other"),
    (["--val_size", "30"], "--val_size 30 exceeds"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_usage_errors_exit_2(ava, tmp_path, capsys, extra, message):
    assert run(["--ava_txt", ava / "AVA.txt", "--img_path", ava / "images", "--out_dir", tmp_path / "out", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
