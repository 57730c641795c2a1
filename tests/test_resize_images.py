"""tools/resize_images.py: the cache gives the originals' eval tensors up to JPEG
re-encoding, keeps relative paths, reruns skip up-to-date files, bad files are
reported with exit code 1."""
import os

import numpy as np
import pytest
from PIL import Image

from bench.ava_like import ava_like_image
from dataset import eval_transform, load_rgb
from model import default_model_args
from tools import resize_images

# Measured on noise-textured AVA-like images at quality 95: mean |difference| of the
# 224 px eval tensors in [0, 1] is 0.008-0.009 (the grain is the hardest case for JPEG;
# smooth scenes differ by 0.002-0.003). A mean difference is blind to small geometric
# errors (a 2-pixel shift of a smooth scene moves it by only 0.005), so the geometry is
# checked exactly, by the cached sizes, and this bound only catches gross damage
# (wrong colours, nearest-neighbour resize of textured images: 0.026).
MAX_MEAN_ABS_DIFF = 0.02
# torchvision's Resize(256) of each original (upright) size: the long side is truncated.
EXPECTED_SIZES = {"a/1001.jpg": (341, 256), "b/c/1002.jpg": (256, 370), "b/small.png": (120, 90),
                  "rotated.jpg": (256, 358)}


def run(*argv):
    return resize_images.main(resize_images.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture()
def originals(tmp_path):
    """Nested folders: two AVA-like JPEGs larger than 256, a small PNG, and a JPEG
    stored sideways with EXIF orientation 6 (displayed rotated by 90 degrees)."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b" / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ava_like_image(rng, 400, 300).save(src / "a" / "1001.jpg", quality=90)
    ava_like_image(rng, 290, 420).save(src / "b" / "c" / "1002.jpg", quality=90)
    ava_like_image(rng, 120, 90).save(src / "b" / "small.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    ava_like_image(rng, 420, 300).save(src / "rotated.jpg", quality=90, exif=exif)
    return src


def test_cache_gives_same_eval_tensors(originals, tmp_path, capsys):
    dst = tmp_path / "cache"
    assert run("--src", originals, "--dst", dst, "--size", 256, "--workers", 0, "--quiet") == 0
    rel = sorted(os.path.relpath(os.path.join(d, f), originals) for d, _, fs in os.walk(originals) for f in fs)
    assert sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst) for f in fs) == rel
    model_args = dict(default_model_args("vgg16"), normalize="none")  # 256 then 224, tensors in [0, 1]
    transform = eval_transform(model_args)
    for name in rel:
        original, cached = load_rgb(originals / name), load_rgb(dst / name)
        with Image.open(dst / name) as raw:
            assert raw.format == "JPEG" and raw.mode == "RGB"
            assert raw.getexif().get(0x0112) is None  # upright: no orientation left to apply
        assert cached.size == EXPECTED_SIZES[name]  # the small one is not upscaled
        diff = (transform(original) - transform(cached)).abs().mean().item()
        assert diff < MAX_MEAN_ABS_DIFF, f"{name}: mean abs difference {diff:.4f}"


def test_rerun_skips_up_to_date_and_redoes_changed(originals, tmp_path, capsys):
    dst = tmp_path / "cache"
    assert run("--src", originals, "--dst", dst, "--workers", 2, "--quiet") == 0  # the Pool path
    capsys.readouterr()
    mtimes = {p: os.path.getmtime(p) for p in dst.rglob("*.*")}
    assert run("--src", originals, "--dst", dst, "--workers", 0, "--quiet") == 0
    assert "0 written, 4 up to date, 0 failed" in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in dst.rglob("*.*")} == mtimes

    # A changed original, a cache file of the wrong size (other --size), and a temporary
    # file from a killed run.
    changed = originals / "a" / "1001.jpg"
    os.utime(changed, (os.path.getmtime(dst / "a" / "1001.jpg") + 10,) * 2)
    Image.new("RGB", (100, 80)).save(dst / "b" / "c" / "1002.jpg")
    (dst / "b" / ".small.png.abc123.tmp").write_bytes(b"half an image")
    assert run("--src", originals, "--dst", dst, "--workers", 0, "--quiet") == 0
    assert "2 written, 2 up to date, 0 failed" in capsys.readouterr().out
    assert not (dst / "b" / ".small.png.abc123.tmp").exists()
    assert min(Image.open(dst / "b" / "c" / "1002.jpg").size) == 256


def test_unreadable_images_reported_others_done(originals, tmp_path, capsys):
    (originals / "a" / "empty.jpg").write_bytes(b"")
    (originals / "b" / "garbage.jpg").write_bytes(b"not a jpeg at all" * 10)
    dst = tmp_path / "cache"
    assert run("--src", originals, "--dst", dst, "--workers", 0, "--quiet") == 1
    out, err = capsys.readouterr()
    assert "4 written, 0 up to date, 2 failed" in out
    assert "empty.jpg: zero-byte file" in err and "garbage.jpg" in err
    assert "2 of 6 images could not be cached:" in err
    assert (dst / "a" / "1001.jpg").exists() and not (dst / "a" / "empty.jpg").exists()
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", ["dst_inside_src", "src_missing", "bad_size", "no_images"])
def test_bad_usage_exit_2(originals, tmp_path, capsys, case):
    argv = {"dst_inside_src": ["--src", originals, "--dst", originals / "cache"],
            "src_missing": ["--src", tmp_path / "nowhere", "--dst", tmp_path / "cache"],
            "bad_size": ["--src", originals, "--dst", tmp_path / "cache", "--size", 0],
            "no_images": ["--src", tmp_path / "cache_empty", "--dst", tmp_path / "cache"]}[case]
    (tmp_path / "cache_empty").mkdir()
    assert run(*argv, "--quiet") == 2
    assert "error: --" in capsys.readouterr().err
    assert not (originals / "cache").exists()
