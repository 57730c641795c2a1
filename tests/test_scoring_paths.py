"""Every caller of the one scoring pipeline writes the same files: main.py --test, test.py
and test.py --gpu_decode (decoding on the CPU here) on the same images and labels, with
TTA, a truncated file, a missing one and a PNG beside the JPEGs; and --gpu_decode with
every kind of source, parquet output and --resume."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, jpeg, make_mixed, read_rows, row_numbers, run_main, run_test, tiny_checkpoint

PHOTOS = os.path.join(ROOT, "tests", "data", "photos")
RESIZE = 40  # the tiny checkpoint's resize size (tiny_checkpoint: 32 px crops of a 40 px resize)
# The label CSV's rows, in an order that is not sorted: (id, votes for 1..10). cut.jpg is a
# JPEG cut in half, gone.jpg does not exist, coffee.png goes through Pillow under --gpu_decode.
ROWS = [("rocket.jpg", [0, 1, 2, 5, 9, 6, 3, 1, 0, 0]), ("china.jpg", [1, 2, 3, 4, 5, 6, 5, 3, 1, 0]),
        ("cut.jpg", [0, 0, 1, 3, 6, 6, 3, 1, 0, 0]), ("grace_grey.jpg", [2, 3, 5, 6, 4, 2, 1, 0, 0, 0]),
        ("gone.jpg", [0, 0, 0, 2, 5, 7, 4, 1, 0, 0]), ("coffee.png", [0, 0, 1, 1, 3, 6, 8, 5, 2, 1]),
        ("flower_tall.jpg", [0, 1, 1, 2, 4, 8, 6, 2, 1, 0]), ("astronaut.jpg", [1, 1, 2, 3, 7, 6, 4, 2, 1, 1])]
SCORED = ["rocket.jpg", "china.jpg", "grace_grey.jpg", "coffee.png", "flower_tall.jpg", "astronaut.jpg"]
COLUMNS = ["image_id", "mean", "std"] + [f"p{k}" for k in range(1, 11)] + ["gt_mean", "gt_std", "percentile"]


def at_resize_size(name, portrait=False, mode="RGB"):
    """A real photograph with its shorter side at RESIZE: neither decoder path resizes it,
    so both crop the same decoded pixels."""
    with Image.open(os.path.join(PHOTOS, name)) as img:
        img = img.convert(mode)
    if portrait:
        img = img.transpose(Image.Transpose.ROTATE_90)
    w, h = img.size
    return img.resize((round(w * RESIZE / h), RESIZE) if w >= h else (RESIZE, round(h * RESIZE / w)), Image.BICUBIC)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    images = root / "images"
    images.mkdir()
    at_resize_size("rocket.jpg").save(images / "rocket.jpg", quality=90)
    at_resize_size("china.jpg").save(images / "china.jpg", quality=90)
    at_resize_size("grace_hopper.jpg", mode="L").save(images / "grace_grey.jpg", quality=90)
    at_resize_size("coffee.png").save(images / "coffee.png")
    at_resize_size("flower.jpg", portrait=True).save(images / "flower_tall.jpg", quality=95, progressive=True)
    at_resize_size("astronaut.png").save(images / "astronaut.jpg", quality=85, subsampling=0)
    at_resize_size("chelsea.png").save(images / "cut.jpg", quality=90)
    whole = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    labels = root / "test_labels.csv"
    labels.write_text("".join(f"{i}," + ",".join(map(str, v)) + "\n" for i, v in ROWS))
    ckpt = root / "ckpt"
    ckpt.mkdir()
    tiny_checkpoint(ckpt / "best.pth")
    return {"root": root, "images": images, "labels": labels, "ckpt": ckpt}


def by_test_py(case, out, *extra):
    return run_test(["--model", case["ckpt"] / "best.pth", "--test_csv", case["labels"], "--test_images", case["images"],
                     "--predictions", out, "--batch_size", "12", "--workers", "0", "--device", "cpu", "--quiet", *extra])


def by_main_py(case, *extra):
    """main.py --test on best.pth, without training; the outputs are in <ckpt>/test."""
    return run_main(["--test", "--img_path", case["images"], "--test_csv_file", case["labels"], "--ckpt_path", case["ckpt"],
                     "--test_batch_size", "12", "--num_workers", "0", "--device", "cpu", "--quiet", *extra])


def count_device_decodes(monkeypatch) -> list:
    """A one-element list counting the images handed to the device JPEG decoder."""
    from engine.score import gpu_decode
    real, count = gpu_decode.decode_jpeg, [0]

    def counting(data, **kwargs):
        count[0] += len(data) if isinstance(data, list) else 1
        return real(data, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", counting)
    return count


def hand_gt_means():
    votes = {i: np.array(v, float) for i, v in ROWS}
    return [float((votes[i] / votes[i].sum()) @ np.arange(1, 11)) for i in SCORED]


@pytest.mark.slow
@pytest.mark.parametrize("tta", [1, 3])
def test_main_py_test_and_gpu_decode_write_what_test_py_writes(case, tmp_path, capsys, monkeypatch, tta):
    plain, device = tmp_path / "plain", tmp_path / "gpu_decode"
    assert by_test_py(case, plain, "--tta", tta) == 1
    decoded = count_device_decodes(monkeypatch)
    assert by_test_py(case, device, "--tta", tta, "--gpu_decode") == 1
    assert decoded == [5]  # the five whole JPEGs (one greyscale, one progressive) went to the device decoder
    capsys.readouterr()
    assert by_main_py(case, "--tta", tta) == 1
    report = capsys.readouterr()
    # What plain test.py wrote, against the CSV: its rows in the CSV's order less the two
    # unreadable files, the ground truth means computed here, both failures named.
    rows = read_rows(plain)
    assert list(rows[0]) == COLUMNS and [r["image_id"] for r in rows] == SCORED
    assert np.allclose([float(r["gt_mean"]) for r in rows], hand_gt_means(), rtol=0, atol=1e-6)
    assert np.allclose(row_numbers(rows)[:, 2:].sum(axis=1), 1, atol=1e-5)
    errors = [(e["path"], e["reason"]) for e in read_rows(plain, "errors.csv")]
    assert errors == [(str(case["images"] / "cut.jpg"), "truncated image"), (str(case["images"] / "gone.jpg"), "file not found")]
    assert json.loads((plain / "metrics.json").read_text())["n"] == len(SCORED)
    # main.py --test: the same pipeline on the same checkpoint and batches, byte for byte,
    # under its own title; no parts left behind.
    test_dir = case["ckpt"] / "test"
    for name in ("predictions.csv", "pred.txt", "metrics.json", "errors.csv"):
        assert (test_dir / name).read_bytes() == (plain / name).read_bytes(), name
    assert (test_dir / "scatter.png").exists() and not (test_dir / "parts").exists()
    assert f"test set ({case['ckpt'] / 'best.pth'}): scored 6 of 8 images" in report.out
    assert "2 images could not be read" in report.err
    # --gpu_decode: the JPEGs decoded by torchvision, the PNG and the broken files by
    # Pillow. At the resize size there is no resize, and the decoded pixels are equal.
    for name in ("predictions.csv", "pred.txt", "metrics.json", "errors.csv"):
        assert (device / name).read_bytes() == (plain / name).read_bytes(), name


def test_main_py_test_with_contact_sheet_and_no_unreadable_image(case, tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_text("".join(f"{i}," + ",".join(map(str, v)) + "\n" for i, v in ROWS if i in SCORED[:3]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "best.pth").write_bytes((case["ckpt"] / "best.pth").read_bytes())
    assert run_main(["--test", "--img_path", case["images"], "--test_csv", good, "--ckpt_path", ckpt, "--workers", "0",
                     "--device", "cpu", "--quiet", "--contact_sheet", "1"]) == 0
    assert [r["image_id"] for r in read_rows(ckpt / "test")] == SCORED[:3]
    assert sorted(os.listdir(ckpt / "test")) == ["contact_sheet.png", "metrics.json", "pred.txt", "predictions.csv",
                                                 "scatter.png"]
    assert "contact_sheet.png" in capsys.readouterr().out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    folder, shards = make_mixed(root, photos=12, per_shard=6)
    return {"folder": folder, "shards": shards, "ckpt": tiny_checkpoint(root / "tiny.pth")}


@pytest.mark.slow
def test_gpu_decode_takes_every_source_parquet_and_resume(mixed, tmp_path, capsys, monkeypatch):
    """What --gpu_decode once refused: several specs (a folder and tar shards), a file
    list, parquet output, --resume. The same rows and errors as without it; the numbers
    within what two JPEG decoders and resizes differ by."""
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "extra.jpg").write_bytes(jpeg(np.random.default_rng(1), 50, 70))
    (tmp_path / "list.txt").write_text("extra.jpg\nnope.jpg\n")
    common = ["--model", mixed["ckpt"], "--test_images", mixed["folder"], str(mixed["shards"] / "{000000..000002}.tar"),
              "--file_list", tmp_path / "list.txt", "--workers", "0", "--batch_size", "5", "--part_size", "4", "--device", "cpu",
              "--quiet"]
    plain, device = tmp_path / "plain", tmp_path / "gpu"
    assert run_test(common + ["--predictions", plain]) == 1
    decoded = count_device_decodes(monkeypatch)
    assert run_test(common + ["--predictions", device, "--gpu_decode", "--output_format", "parquet", "--keep_parts"]) == 1
    assert decoded == [9 + 3 * 6 + 1]  # every whole JPEG: 9 of the 12 photos are, no PNG or webp member is
    a, b = read_rows(plain), read_rows(device)
    # 12 photos, 3 shards of 6 and the key 'dup' in two of them, the list's one readable file.
    assert len(a) == 12 + 3 * 6 + 2 + 1 and [r["image_id"] for r in b] == [r["image_id"] for r in a]
    assert read_rows(device, "errors.csv") == read_rows(plain, "errors.csv")
    assert len(read_rows(plain, "errors.csv")) == 2 + 3 + 1  # the folder's 2, a member per shard, the list's missing file
    assert np.abs(row_numbers(a) - row_numbers(b)).max() < 1e-3
    import pyarrow.parquet as pq
    assert pq.read_table(device / "predictions.parquet").column("image_id").to_pylist() == [r["image_id"] for r in b]
    # --resume after losing two part files: only their images are scored again.
    parts = sorted((device / "parts").glob("part-*.csv"))
    lost = {r["ref"] for p in parts[-2:] for r in read_rows(p.parent, p.name)}
    assert len(parts) > 2 and lost
    for p in parts[-2:]:
        p.unlink()
    capsys.readouterr()
    assert run_test(common + ["--predictions", device, "--gpu_decode", "--resume", "--keep_parts"]) == 1
    kept = len(parts) - 2
    assert f"resuming: {kept} part file{'s' if kept > 1 else ''} in" in capsys.readouterr().out
    new = set((device / "parts").glob("part-*.csv")) - set(parts)
    assert {r["ref"] for p in new for r in read_rows(p.parent, p.name)} == lost
    c = read_rows(device)
    assert [r["image_id"] for r in c] == [r["image_id"] for r in b]
    assert np.allclose(row_numbers(c), row_numbers(b), rtol=0, atol=2e-6)
