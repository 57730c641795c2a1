"""The decode limits (dataset.decode_limits) wherever images are read: a progressive JPEG
of more than 100 scans is refused from its markers, a decode whose memory estimate is
over --max_decode_mb is refused before decoding, and a decode that overruns
--decode_timeout is cut; each an unreadable image with its reason in test.py's
errors.csv, tools.check_images' report and training's log, with loader workers or
without. The scan bombs are written by hand (conftest.jpeg_scan_bomb)."""
import io
import json
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, jpeg, jpeg_scan_bomb, read_rows, run_main, run_test, tiny_train_args
from dataset.decode_limits import DecodeLimits, deadline, jpeg_scans
from dataset.images import ImageReadError, load_rgb
from tools import check_images

MIB = 1024 * 1024
PHOTOS = ROOT + "/tests/data/photos"


def png16(width, height, channels, flat=False) -> bytes:
    """A 16-bit PNG (RGBA: colour type 6, RGB: 2) written by hand: Pillow's own writer has
    no 16-bit colour modes. Noise, or one grey level (`flat`: a large image in a small file)."""
    rng = np.random.default_rng(3)
    shape = (height, width, channels)
    pixels = (np.full(shape, 30000, np.uint16) if flat else rng.integers(0, 65536, shape, dtype=np.uint16)).astype(">u2")
    raw = b"".join(b"\0" + pixels[y].tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, 6 if channels == 4 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def encoded(img, fmt, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_rgb(width, height, seed=0) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height))


def test_jpeg_scans_counts_the_first_images_scans():
    photo = noise_rgb(64, 48)
    # libjpeg's standard progression: 10 scans for colour (DC, then AC bands of Y, Cb, Cr
    # and their refinements), 6 for greyscale; a baseline file has 1.
    assert jpeg_scans(encoded(photo, "JPEG")) == 1
    assert jpeg_scans(encoded(photo, "JPEG", progressive=True)) == 10
    assert jpeg_scans(encoded(photo.convert("L"), "JPEG", progressive=True)) == 6
    for scans in (2, 99, 100, 101, 1000):
        assert jpeg_scans(jpeg_scan_bomb(1024, 1024, scans), stop_after=10_000) == scans
    # Two JPEGs back to back (an MPO's second picture): only the first image's count.
    assert jpeg_scans(encoded(photo, "JPEG", progressive=True) + encoded(photo, "JPEG")) == 10
    # Start-of-scan bytes inside a comment segment are skipped by its length.
    progressive = encoded(photo, "JPEG", progressive=True)
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 40) + b"\xff\xda" * 20
    assert jpeg_scans(progressive[:2] + comment + progressive[2:]) == 10
    # The count stops early: a bomb is judged without walking all of it.
    assert jpeg_scans(jpeg_scan_bomb(1024, 1024, 5000)) == 101


@pytest.mark.parametrize("scans, refused", [(99, False), (100, False), (101, True), (10_000, True)])
def test_scan_bound_edges(scans, refused):
    data = jpeg_scan_bomb(1024, 1024, scans)
    if not refused:
        assert load_rgb(io.BytesIO(data)).size == (1024, 1024)
        return
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="more than 100 scans") as caught:
        load_rgb(io.BytesIO(data))
    assert "refused before decoding" in str(caught.value)
    assert time.perf_counter() - start < 30  # a bound against a hang: decoding 10,000 scans takes seconds here


@pytest.mark.parametrize("make, bytes_per_pixel", [
    # The documented peak bytes a pixel (docs/serving.md): RGB modes 12, RGBA 24, L 6, P 18.
    (lambda: encoded(noise_rgb(500, 400), "PNG"), 12),
    (lambda: png16(500, 400, 4), 24),   # 16-bit RGBA opens as RGBA
    (lambda: encoded(noise_rgb(500, 400).convert("L"), "PNG"), 6),
    (lambda: encoded(noise_rgb(500, 400).convert("P"), "PNG"), 18),
])
def test_memory_estimate_edges(make, bytes_per_pixel):
    data = make()
    need = 500 * 400 * bytes_per_pixel
    assert load_rgb(io.BytesIO(data), limits=DecodeLimits(10, need / MIB)).size == (500, 400)  # at the budget
    with pytest.raises(ImageReadError, match=r"too large to decode: 500x400 .* above --max_decode_mb"):
        load_rgb(io.BytesIO(data), limits=DecodeLimits(10, (need - 1) / MIB))  # one byte over


PEAK_SCRIPT = r"""
import ctypes, io, json, re, sys
sys.path.insert(0, sys.argv[1])
from PIL import Image
from dataset.decode_limits import decode_bytes
from dataset.images import load_rgb

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed: image buffers are unmapped when freed, so each case starts afresh

def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024

for path in sys.argv[2:]:
    data = open(path, "rb").read()
    with Image.open(io.BytesIO(data)) as img:
        estimate, mode = decode_bytes(img), img.mode
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS: earlier peaks do not count
    before = status("VmRSS")
    load_rgb(io.BytesIO(data), max_pixels=10**9).resize((256, 256))
    print(json.dumps({"path": path, "mode": mode, "estimate": estimate, "grew": status("VmHWM") - before}))
"""


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc, resets it with clear_refs")
def test_memory_estimate_bounds_the_measured_peak(tmp_path):
    """The estimate against the peak RSS growth the kernel measures (VmHWM, reset before
    each decode) for load_rgb and a resize: never more than 5 % + 4 MiB under it, and not
    more than 1.5 times over it (an estimate that refuses only what needs the memory)."""
    size = (2000, 1600)
    rgb = noise_rgb(*size)
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), np.asarray(rgb.convert("L"))]), "RGBA")
    cases = {"rgb.jpg": encoded(rgb, "JPEG", quality=90), "progressive.jpg": encoded(rgb, "JPEG", progressive=True),
             "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"), "grey.png": encoded(rgb.convert("L"), "PNG"),
             "palette.png": encoded(rgb.convert("P"), "PNG"), "rgba16.png": png16(*size, 4), "rgba.png": encoded(rgba, "PNG"),
             "float.tif": encoded(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32)), "TIFF"),
             "i16.png": encoded(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
             "rgba.webp": encoded(rgba, "WEBP", quality=80)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, ROOT, *(str(tmp_path / n) for n in cases)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == len(cases)
    for r in results:
        assert r["grew"] <= r["estimate"] * 1.05 + 4 * MIB, r
        assert r["estimate"] <= r["grew"] * 1.5, r


def test_deadline_cuts_a_slow_decode_and_leaves_no_timer():
    slow = jpeg_scan_bomb(4096, 4096, 100)  # within the scan bound: 100 scans of 16.8 megapixels, over 0.1 s to decode
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(ImageReadError, match=r"^decode took longer than --decode_timeout 0.01 s$"):
        load_rgb(io.BytesIO(slow), limits=DecodeLimits(0.01, 1024))
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert load_rgb(io.BytesIO(slow), limits=DecodeLimits(0, 1024)).size == (4096, 4096)  # 0: no deadline
    # A deadline the body meets: nothing raised, nothing left behind.
    with deadline(30):
        load_rgb(PHOTOS + "/china.jpg")
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_deadline_needs_the_main_thread():
    """Signals reach only the main thread: elsewhere the decode runs without a deadline."""
    slow = jpeg_scan_bomb(4096, 4096, 100)
    got = []
    thread = threading.Thread(target=lambda: got.append(load_rgb(io.BytesIO(slow), limits=DecodeLimits(0.01, 1024)).size))
    thread.start()
    thread.join(60)
    assert got == [(4096, 4096)]


def hostile_folder(root):
    """Two small JPEGs, a 5,000-scan bomb (6 MiB to decode), a slow JPEG (100 scans of 36
    megapixels, 206 MiB) and a flat 16-bit RGBA PNG of 4000 x 3000 (275 MiB at 24 bytes
    a pixel). Run with --decode_timeout 0.05 --max_decode_mb 240: each hostile file
    fails one limit, for its own reason."""
    root.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(jpeg(rng))
    (root / "bomb.jpg").write_bytes(jpeg_scan_bomb(1024, 1024, 5000))
    (root / "slow.jpg").write_bytes(jpeg_scan_bomb(6000, 6000, 100))
    (root / "rgba16.png").write_bytes(png16(4000, 3000, 4, flat=True))
    return root


LIMIT_FLAGS = ["--decode_timeout", "0.05", "--max_decode_mb", "240"]
REASONS = {"bomb.jpg": "more than 100 scans", "slow.jpg": "decode took longer than --decode_timeout 0.05 s",
           "rgba16.png": "4000x3000 RGBA needs about 275 MiB (24 bytes a pixel), above --max_decode_mb 240"}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_test_py_reports_each_limit_in_errors_csv(tiny_ckpt, tmp_path, workers):
    images = hostile_folder(tmp_path / "images")
    out = tmp_path / "out"
    code = run_test(["--model", tiny_ckpt, "--test_images", images, "--predictions", out, "--device", "cpu", "--quiet",
                     "--num_workers", workers, "--batch_size", 2, *LIMIT_FLAGS])
    assert code == 1  # some images unreadable
    assert sorted(r["image_id"] for r in read_rows(out)) == ["a.jpg", "b.jpg"]
    errors = {row["path"].rsplit("/", 1)[1]: row["reason"] for row in read_rows(out, "errors.csv")}
    assert set(errors) == set(REASONS)
    for name, words in REASONS.items():
        assert words in errors[name], (name, errors[name])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_check_images_reports_each_limit(tmp_path, workers):
    images = hostile_folder(tmp_path / "images")
    args = check_images.get_args_parser().parse_args(["--img_path", str(images), "--workers", str(workers), "--quiet",
                                                      "--out", str(tmp_path), *LIMIT_FLAGS])
    assert check_images.main(args) == 1
    reasons = {row["path"].rsplit("/", 1)[1]: row["reason"] for row in read_rows(tmp_path, "bad_images.csv")}
    assert set(reasons) == set(REASONS)
    for name, words in REASONS.items():
        assert words in reasons[name], (name, reasons[name])


@pytest.mark.slow
def test_training_skips_a_scan_bomb_with_its_reason(demo_data, tmp_path, capsys):
    data = tmp_path / "demo"
    shutil.copytree(demo_data, data)
    first_id = (data / "train_labels.csv").read_text().split(",", 1)[0]  # no header: the first row's image id
    victim = next((data / "images").glob(f"{first_id}.*"))
    victim.write_bytes(jpeg_scan_bomb(1024, 1024, 5000))
    assert run_main(tiny_train_args(data, tmp_path / "ckpt", "--epochs", "1", "--num_workers", "1")) == 0
    assert f"{victim.name}: too many scans: a progressive JPEG of more than 100 scans" in capsys.readouterr().out


def test_usage_errors_name_the_flag(tiny_ckpt, tmp_path, capsys):
    for argv, words in ((["--decode_timeout", "-1"], "--decode_timeout must be >= 0"),
                        (["--max_decode_mb", "0"], "--max_decode_mb must be > 0")):
        assert run_test(["--model", tiny_ckpt, "--test_images", PHOTOS, "--predictions", tmp_path, *argv]) == 2
        assert words in capsys.readouterr().err
        args = check_images.get_args_parser().parse_args(["--img_path", PHOTOS, *argv])
        assert check_images.main(args) == 2
        assert words in capsys.readouterr().err
