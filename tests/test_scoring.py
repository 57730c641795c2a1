"""Scoring your own photos with test.py: any format and mode, folders, globs, single
files, broken files, and deterministic test-time augmentation."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo_folder, noise, run_test, tiny_checkpoint
from dataset.images import load_rgb

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    valid, broken = make_photo_folder(root / "mixed")
    good = root / "good"
    good.mkdir()
    rng = np.random.default_rng(5)
    for n in range(4):
        Image.fromarray(noise(rng, 40 + 8 * n, 56)).save(good / f"img{n}.jpg")
    Image.fromarray(noise(rng)).save(good / "other.png")
    return {"mixed": root / "mixed", "valid": valid, "broken": broken, "good": good,
            "ckpt": tiny_checkpoint(root / "tiny.pth")}


def score(photos, images, out, *extra):
    return run_test(["--model", photos["ckpt"], "--test_images", images, "--predictions", out,
                     "--workers", "0", "--quiet", *extra])


def read_rows(out):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_load_rgb_modes(photos):
    mixed = photos["mixed"]
    for rel in photos["valid"]:
        assert load_rgb(mixed / rel).mode == "RGB", rel
    # EXIF orientation 6 turns the stored 48x32 into a 32x48 picture.
    assert load_rgb(mixed / "sub" / "k_exif6.jpg").size == (32, 48)
    # Animated GIF: the first (red) frame.
    assert load_rgb(mixed / "sub" / "j_animated.gif").getpixel((5, 5)) == (255, 0, 0)
    # Transparent palette entries are composited onto white.
    with Image.open(mixed / "c_palette_transparent.png") as pal:
        idx = np.asarray(pal)
    clear = np.argwhere(idx == 0)
    assert len(clear) > 0
    rgb = np.asarray(load_rgb(mixed / "c_palette_transparent.png"))
    assert (rgb[idx == 0] == 255).all() and not (rgb[idx != 0] == 255).all()


def test_load_rgb_16_bit_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert raw.mode in ("I;16", "I")
    gray = np.asarray(load_rgb(tmp_path / "ramp16.png"))[..., 0].astype(int)
    expected = np.clip(ramp * (255.0 / 65535), 0, 255).astype(int)
    assert np.abs(gray - expected).max() <= 1
    assert gray.max() == 255 and (gray == 255).sum() == 1  # clipping would saturate all but the first 1 %


def test_folder_with_every_format_and_broken_files(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert score(photos, photos["mixed"], out) == 1
    rows = read_rows(out)
    assert [r["image_id"] for r in rows] == photos["valid"]  # relative to the folder, sorted by path
    for r in rows:
        dist = np.array([float(r[f"p{k}"]) for k in range(1, 11)])
        assert dist.sum() == pytest.approx(1.0, abs=1e-5) and 1 <= float(r["mean"]) <= 10
    with open(out / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert [os.path.relpath(e["path"], photos["mixed"]) for e in errors] == photos["broken"]
    reasons = {os.path.basename(e["path"]): e["reason"] for e in errors}
    assert reasons["zero.jpg"] == "zero-byte file"
    assert reasons["truncated.jpg"] == "truncated image"
    assert "identify" in reasons["text.jpg"]
    assert (out / "pred.txt").read_text().splitlines()[0].startswith("a_rgb.jpg mean: ")
    assert "3 images could not be read" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_all_good_folder_exits_0_and_clears_old_errors(photos, tmp_path):
    out = tmp_path / "out"
    assert score(photos, photos["mixed"], out) == 1 and (out / "errors.csv").exists()
    assert score(photos, photos["good"], out, "--workers", "2") == 0  # also through loader workers
    assert [r["image_id"] for r in read_rows(out)] == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "other.png"]
    assert not (out / "errors.csv").exists()


def test_glob_and_single_file(photos, tmp_path):
    mixed = photos["mixed"]
    assert score(photos, str(mixed / "*.png"), tmp_path / "png") == 0  # quoted glob: test.py expands it
    assert [r["image_id"] for r in read_rows(tmp_path / "png")] == [p for p in photos["valid"] if p.endswith(".png")]
    assert score(photos, str(mixed / "**" / "*.jpg"), tmp_path / "jpg") == 1
    assert [r["image_id"] for r in read_rows(tmp_path / "jpg")] == ["a_rgb.jpg", "sub/k_exif6.jpg"]
    assert score(photos, mixed / "h.webp", tmp_path / "one") == 0
    rows = read_rows(tmp_path / "one")
    assert [r["image_id"] for r in rows] == ["h.webp"]
    # The same image scores the same alone or within its folder.
    in_folder = {r["image_id"]: r for r in read_rows(tmp_path / "png")}
    assert score(photos, mixed / "d_gray.png", tmp_path / "one") == 0
    assert abs(float(read_rows(tmp_path / "one")[0]["mean"]) - float(in_folder["d_gray.png"]["mean"])) < 1e-5


def test_empty_folder_and_bad_tta_are_usage_errors(photos, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert score(photos, empty, tmp_path / "out") == 2
    assert "no image files found" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert score(photos, str(empty / "*.jpg"), tmp_path / "out") == 2
    for bad in ("11", "0"):
        assert score(photos, photos["good"], tmp_path / "out", "--tta", bad) == 2
        assert "--tta must be between 1 and 10" in capsys.readouterr().err


def test_tta_is_deterministic_and_tta_1_is_plain_inference(photos, tmp_path):
    good = photos["good"]
    assert score(photos, good, tmp_path / "plain") == 0
    assert score(photos, good, tmp_path / "tta1", "--tta", "1") == 0
    assert score(photos, good, tmp_path / "tta10a", "--tta", "10") == 0
    assert score(photos, good, tmp_path / "tta10b", "--tta", "10") == 0
    assert score(photos, good, tmp_path / "tta10c", "--tta", "10", "--batch_size", "2") == 0
    assert (tmp_path / "plain" / "predictions.csv").read_bytes() == (tmp_path / "tta1" / "predictions.csv").read_bytes()
    assert (tmp_path / "tta10a" / "predictions.csv").read_bytes() == (tmp_path / "tta10b" / "predictions.csv").read_bytes()
    a, c = read_rows(tmp_path / "tta10a"), read_rows(tmp_path / "tta10c")
    for x, y in zip(a, c):  # another batch size: the same to float rounding
        assert all(abs(float(x[k]) - float(y[k])) <= 1e-6 for k in ("mean", "std", "p1", "p5", "p10"))
    plain = read_rows(tmp_path / "plain")
    assert max(abs(float(x["mean"]) - float(y["mean"])) for x, y in zip(a, plain)) > 1e-4
