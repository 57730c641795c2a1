"""Scoring your own photos with test.py: any format and mode, folders, globs, single
files, broken files, and deterministic test-time augmentation."""
import csv
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_test
from dataset.images import load_rgb
from model import build_model, default_model_args, save_checkpoint

EXIF_ORIENTATION = 0x0112


def tiny_checkpoint(path, seed=0):
    """A randomly initialised tiny_cnn NIMA saved in our checkpoint format (README, "Formats")."""
    torch.manual_seed(seed)
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    save_checkpoint(path, {"model": build_model(model_args).state_dict(), "model_args": model_args})
    return path


def noise(rng, w=48, h=40, channels=3):
    return rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def make_photo_folder(root):
    """One valid image per format/mode (ids -> expected readable), plus broken files in a
    nested folder. Returns (valid relative paths, broken relative paths)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "broken").mkdir(parents=True)
    Image.fromarray(noise(rng)).save(root / "a_rgb.jpg", quality=90)
    Image.fromarray(noise(rng, channels=4), "RGBA").save(root / "b_rgba.png")
    pal = Image.fromarray(noise(rng)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(root / "c_palette_transparent.png", transparency=0)
    Image.fromarray(noise(rng, channels=1), "L").save(root / "d_gray.png")
    Image.fromarray(noise(rng, channels=2), "LA").save(root / "e_gray_alpha.png")
    Image.fromarray((noise(rng, channels=1).astype(np.uint16) * 257)).save(root / "f_16bit.png")
    Image.fromarray(noise(rng)).convert("CMYK").save(root / "g_cmyk.tif")
    Image.fromarray(noise(rng)).save(root / "h.webp", quality=90)
    Image.fromarray(noise(rng)).save(root / "i.bmp")
    frames = [Image.new("RGB", (48, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "sub" / "j_animated.gif", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored landscape, shown portrait (rotate 90 degrees clockwise)
    Image.fromarray(noise(rng, w=48, h=32)).save(root / "sub" / "k_exif6.jpg", exif=exif.tobytes())
    # Broken: zero bytes, a JPEG cut in half, text with an image name; plus a non-image to ignore.
    (root / "sub" / "broken" / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(noise(rng, 96, 80)).save(buf, "JPEG", quality=95)
    (root / "sub" / "broken" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "sub" / "broken" / "text.jpg").write_text("not a picture\n")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    valid = ["a_rgb.jpg", "b_rgba.png", "c_palette_transparent.png", "d_gray.png", "e_gray_alpha.png", "f_16bit.png",
             "g_cmyk.tif", "h.webp", "i.bmp", "sub/j_animated.gif", "sub/k_exif6.jpg"]
    broken = ["sub/broken/text.jpg", "sub/broken/truncated.jpg", "sub/broken/zero.jpg"]
    return valid, broken


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
    assert "3 image(s) could not be read" in capsys.readouterr().err
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
