"""tools/check_images.py on planted bad files: the report, the cleaned CSV, exit codes."""
import csv

import numpy as np
import pytest
from PIL import Image

from dataset import eval_transform, load_rgb
from tools import check_images


def run(argv):
    return check_images.main(check_images.get_args_parser().parse_args([str(a) for a in argv]))


def save_noise(path, width, height):
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def images(tmp_path):
    """Good images (one in a sub-folder) and one file of each kind of problem."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("good1.jpg", "good2.png", "sub/good3.jpg"):
        save_noise(folder / name, 64, 48)
    save_noise(folder / "small.jpg", 40, 20)
    (folder / "zero.jpg").write_bytes(b"")
    save_noise(folder / "whole.jpg", 64, 48)
    payload = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "trunc.jpg").write_bytes(payload[:len(payload) // 2])  # header intact, scan data cut
    (folder / "text.jpg").write_text("this is not a JPEG")
    png = bytearray((folder / "good2.png").read_bytes())
    start = png.find(b"IDAT") + 8
    png[start:start + 32] = bytes(b ^ 0xFF for b in png[start:start + 32])  # compressed data garbled
    (folder / "broken.png").write_bytes(bytes(png))
    return folder


EXPECTED_BAD = {
    "zero.jpg": "zero-byte file",
    "trunc.jpg": "truncated image",
    "text.jpg": "not an image Pillow can identify",
    "small.jpg": "too small: 40x20, shorter side below --min_size 32",
    "broken.png": "undecodable: broken data stream when reading image file",
}


def read_report(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    return rows[1:]


def test_folder_every_bad_file_reported_with_its_reason(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["--img_path", images, "--workers", "2", "--min_size", "32", "--out", out, "--quiet"]) == 1
    report = read_report(out / "bad_images.csv")
    assert report == sorted([str(images / name), reason] for name, reason in EXPECTED_BAD.items())
    printed = capsys.readouterr().out
    assert "checked 8 images" in printed and "images/s per worker (2 workers)" in printed
    assert "5 bad" in printed


def test_min_size_default_drops_nothing_the_transforms_can_use(images, tmp_path):
    """The transforms resize the shorter side to --resize_size before cropping, so a
    300x200 photo, a 40x20 thumbnail and a 1x1 pixel all give a crop: none is bad by
    default (the old default, 224, listed every one of them as too small)."""
    for name, size in (("photo.jpg", (300, 200)), ("pixel.png", (1, 1))):
        save_noise(images / name, *size)
    transform = eval_transform({"image_size": 224, "resize_size": 256, "normalize": "imagenet"})
    for name in ("photo.jpg", "pixel.png", "small.jpg"):
        assert transform(load_rgb(images / name)).shape == (3, 224, 224)
    assert run(["--img_path", images, "--workers", "1", "--out", tmp_path, "--quiet"]) == 1
    reasons = dict(read_report(tmp_path / "bad_images.csv"))
    assert not any(reason.startswith("too small") for reason in reasons.values()), reasons
    assert set(reasons) == {str(images / n) for n in EXPECTED_BAD if n != "small.jpg"}


def test_min_size_drops_what_is_below_it(images, tmp_path):
    assert run(["--img_path", images, "--workers", "1", "--min_size", "48", "--out", tmp_path, "--quiet"]) == 1
    small = {path for path, reason in read_report(tmp_path / "bad_images.csv") if reason.startswith("too small")}
    assert small == {str(images / "small.jpg")}


def test_csv_cleaned_copy_is_the_input_minus_bad_rows(images, tmp_path, capsys):
    lines = [b"image_id,r1,r2,r3,r4,r5,r6,r7,r8,r9,r10\n",
             b"good1," + b"1," * 9 + b"1\r\n",                 # CRLF kept as it is
             b"trunc," + b"2," * 9 + b"2\n",
             b"\n",
             b"missing_id," + b"3," * 9 + b"3\n",
             b"sub/good3," + b"4," * 9 + b"4\n",
             b"small.jpg," + b"5," * 9 + b"5\n",
             b"good2," + b"6," * 9 + b"6"]                      # no final newline
    labels = tmp_path / "labels" / "train_labels.csv"
    labels.parent.mkdir()
    labels.write_bytes(b"".join(lines))
    assert run(["--img_path", images, "--csv", labels, "--workers", "2", "--min_size", "32", "--quiet"]) == 1
    # Default output folder: beside the CSV.
    clean = labels.parent / "train_labels_clean.csv"
    assert clean.read_bytes() == b"".join(lines[i] for i in (0, 1, 3, 5, 7))
    assert read_report(labels.parent / "train_labels_bad_images.csv") == [
        [str(images / "missing_id.jpg"), "file not found"],
        [str(images / "small.jpg"), EXPECTED_BAD["small.jpg"]],
        [str(images / "trunc.jpg"), EXPECTED_BAD["trunc.jpg"]]]
    assert "3 of 6 rows kept" in capsys.readouterr().out


def test_all_good_exit_0_and_empty_report(images, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in ("a.jpg", "b.png"):
        (good / name).write_bytes((images / ("good1.jpg" if name.endswith("jpg") else "good2.png")).read_bytes())
    assert run(["--img_path", good, "--min_size", "0", "--out", tmp_path, "--quiet"]) == 0
    assert read_report(tmp_path / "bad_images.csv") == []


def test_header_check_is_cheaper_and_misses_only_cut_scan_data(images):
    """ava_to_csv's default check: same verdicts as the full decode except for a JPEG cut
    after its header, which only a full decode finds."""
    assert check_images.check_image(str(images / "trunc.jpg"), full_decode=False) is None
    assert check_images.check_image(str(images / "trunc.jpg")) == "truncated image"
    for name in ("zero.jpg", "text.jpg"):
        assert check_images.check_image(str(images / name), full_decode=False) == EXPECTED_BAD[name]
    assert check_images.check_image(str(images / "broken.png"), full_decode=False).startswith("undecodable")


@pytest.mark.parametrize("argv", [["--img_path", "no/such/folder"], ["--workers", "0"], ["--csv", "no_such.csv"]])
def test_usage_errors_exit_2(images, argv, capsys):
    full = argv if argv[0] == "--img_path" else ["--img_path", images, *argv]
    assert run(full) == 2
    assert "error:" in capsys.readouterr().err


def test_unwritable_out_exits_2(images, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run(["--img_path", images, "--min_size", "0", "--out", blocker / "out", "--quiet"]) == 2
    assert str(blocker / "out") in capsys.readouterr().err
