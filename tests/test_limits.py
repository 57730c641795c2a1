"""Every limit at its edge: exactly at it (allowed), one below, one past. The pixel limit
on the image and on its resize (load_rgb, check_resizable, test.py, main.py), part
sizes, batch sizes under TTA, and tools.check_images --min_size. The HTTP service's
limits are in test_serve_limits.py. Expectations are worked out by hand (or read from
torchvision's own Resize, for the resized size)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import hand_crops, read_rows, run_main, run_test, tiny_train_args, to_input
from dataset.images import ImageReadError, check_resizable, header_size, load_rgb, read_image_size
from engine.score.collection import PartWriter
from engine.score.inference import images_per_batch
from engine.score.parts import part_files, read_part
from model import load_for_inference
from tools import check_images


def image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("read", [load_rgb, header_size, read_image_size])
def test_pixel_limit_at_below_and_past(tmp_path, read):
    path = image(tmp_path / "a.png", 50, 40)  # 2,000 pixels
    for limit in (2000, 2001):
        read(path, max_pixels=limit)
    with pytest.raises(ImageReadError, match=r"too large: 50x40 = 2000 pixels, above --max_image_pixels 1999"):
        read(path, max_pixels=1999)


@pytest.mark.parametrize("size", [(3, 100), (100, 3), (7, 10), (10, 7), (40, 40), (13, 13), (1, 500), (41, 1000)])
def test_resize_limit_at_below_and_past(size):
    """The pixels of the resized image, as torchvision's Resize(40) makes it: allowed at
    that count, refused one below it."""
    resized = T.Resize(40)(Image.new("RGB", size)).size
    pixels = resized[0] * resized[1]
    for limit in (pixels, pixels + 1):
        check_resizable(size, 40, limit)
    with pytest.raises(ImageReadError, match=f"is {pixels} pixels, above --max_image_pixels {pixels - 1}"):
        check_resizable(size, 40, pixels - 1)


@pytest.fixture(scope="module")
def edge_images(tmp_path_factory):
    """big: 100x80 = 8,000 pixels (resized to 40 on its shorter side: 50x40); strip:
    30x20 = 600 pixels, whose resize is 60x40 = 2,400. Each in its own folder."""
    root = tmp_path_factory.mktemp("edges")
    for name, w, h in (("big", 100, 80), ("strip", 30, 20)):
        (root / name).mkdir()
        image(root / name / f"{name}.png", w, h)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name,limit,kept,reason", [
    ("big", 8001, True, ""), ("big", 8000, True, ""), ("big", 7999, False, "too large: 100x80 = 8000 pixels"),
    ("strip", 2401, True, ""), ("strip", 2400, True, ""), ("strip", 2399, False, "too elongated: 30x20"),
])
def test_test_py_max_image_pixels(edge_images, tiny_ckpt, tmp_path, name, limit, kept, reason):
    out = tmp_path / "out"
    code = run_test(["--model", tiny_ckpt, "--test_images", edge_images / name, "--predictions", out,
                     "--max_image_pixels", limit, "--workers", "0", "--quiet"])
    assert code == (0 if kept else 1)
    if kept:
        assert [r["image_id"] for r in read_rows(out)] == [f"{name}.png"]
    else:
        errors = read_rows(out, "errors.csv")
        assert len(errors) == 1 and errors[0]["reason"].startswith(reason), errors
        assert f"--max_image_pixels {limit}" in errors[0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("limit", [6912, 6911])
def test_main_py_max_image_pixels(demo_data, tmp_path, capsys, limit):
    """Every demo image is 96x72 or 72x96 = 6,912 pixels: at the limit all train; one
    below, none can, and the run says so (no readable validation image: exit 1)."""
    ckpt = tmp_path / "ckpt"
    code = run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1", "--max_image_pixels", limit))
    captured = capsys.readouterr()
    if limit == 6912:
        assert code == 0
        record = json.loads((ckpt / "metrics.jsonl").read_text().splitlines()[0])
        assert (record["skipped_images"], record["val_unreadable_images"]) == (0, 0)
    else:
        assert code == 1
        assert "above --max_image_pixels 6911" in captured.out + captured.err
        assert "no readable image" in captured.err


# ---- part sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("batches,part_size,parts", [
    ([3, 3, 1], 7, [7]), ([3, 3, 1], 6, [6, 1]), ([3, 3, 1], 8, [7]), ([3, 3, 1], 3, [3, 3, 1]),
    ([3, 3, 1], 4, [4, 3]), ([3, 3, 1], 1, [1] * 7), ([8], 3, [3, 3, 2]), ([2, 2], 4, [4]), ([], 5, []),
])
def test_part_files_hold_part_size_results(tmp_path, batches, part_size, parts):
    """Results arrive a batch at a time; each part file holds exactly part_size of them
    (the last what is left), whatever the batch size, in arrival order; a part is on disk
    as soon as it is full, not held back for the next batch."""
    writer = PartWriter(str(tmp_path), rank=0, part_size=part_size, flush_seconds=float("inf"))
    n = 0
    for size in batches:
        writer.add([(f"img{n + k}", 0, f"img{n + k}", -1, "ok", "", [0.1] * 10) for k in range(size)])
        n += size
        assert len(part_files(str(tmp_path))) == n // part_size, n
    writer.flush()
    files = part_files(str(tmp_path))
    assert [len(list(read_part(f))) for f in files] == parts
    assert [r[0] for f in files for r in read_part(f)] == [f"img{k}" for k in range(n)]
    assert writer.written == n


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seven")
    for k in range(7):
        image(folder / f"p{k}.png", 48, 40, seed=k)
    return folder


def part_sizes(out):
    sizes = []
    for part in sorted((out / "parts").glob("part-*.csv")):
        with open(part, newline="") as f:
            sizes.append(sum(1 for _ in csv.DictReader(f)))
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("part_size,parts", [(6, [6, 1]), (7, [7]), (8, [7])])
def test_test_py_part_size(seven, tiny_ckpt, tmp_path, part_size, parts):
    out = tmp_path / "out"
    assert run_test(["--model", tiny_ckpt, "--test_images", seven, "--predictions", out, "--part_size", part_size,
                     "--batch_size", "3", "--workers", "0", "--keep_parts", "--quiet"]) == 0
    assert part_sizes(out) == parts
    assert len(read_rows(out)) == 7


# ---- batch sizes ------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,tta,images", [
    (1, 1, 1), (6, 1, 6), (9, 10, 1), (10, 10, 1), (11, 10, 1), (19, 10, 1), (20, 10, 2), (5, 2, 2), (4, 2, 2), (3, 2, 1)])
def test_batch_size_counts_crops(batch_size, tta, images):
    assert images_per_batch(batch_size, tta) == images


def expected_means(ckpt, folder, tta):
    """Each image's predicted mean by hand: the crops made with PIL/numpy (conftest), the
    model's forward pass, the average distribution, its mean rating."""
    model, args = load_for_inference(ckpt, torch.device("cpu"))
    means = {}
    for path in sorted(folder.iterdir()):
        crops = hand_crops(path, args["resize_size"], args["image_size"])[:tta]
        with torch.no_grad():
            dist = model(torch.stack([to_input(c, args["normalize"]) for c in crops])).mean(0)
        means[path.name] = float((dist * torch.arange(1, 11)).sum())
    return means


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,tta", [(6, 1), (7, 1), (8, 1), (13, 2), (14, 2), (15, 2)])
def test_every_image_scored_once_at_batch_size_edges(seven, tiny_ckpt, tmp_path, batch_size, tta):
    """7 images in batches of 6, 7 and 8 inputs; under --tta 2, 13, 14 and 15 inputs
    (6, 7 and 7 images): every image once, each with its own scores."""
    out = tmp_path / "out"
    assert run_test(["--model", tiny_ckpt, "--test_images", seven, "--predictions", out, "--batch_size", batch_size,
                     "--tta", tta, "--workers", "0", "--quiet"]) == 0
    got = {r["image_id"]: float(r["mean"]) for r in read_rows(out)}
    want = expected_means(tiny_ckpt, seven, tta)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-4), name


# ---- tools.check_images --min_size ------------------------------------------------------

@pytest.mark.parametrize("min_size,small", [(0, False), (19, False), (20, False), (21, True)])
def test_check_images_min_size(tmp_path, min_size, small):
    path = image(tmp_path / "thumb.png", 30, 20)  # shorter side 20
    reason = check_images.check_image(str(path), min_size=min_size)
    assert reason == ("too small: 30x20, shorter side below --min_size 21" if small else None)


@pytest.mark.parametrize("min_size,listed", [(20, []), (21, ["thumb.png"])])
def test_check_images_cli_min_size(tmp_path, min_size, listed):
    folder = tmp_path / "imgs"
    folder.mkdir()
    image(folder / "thumb.png", 30, 20)
    image(folder / "fine.png", 40, 40)
    out = tmp_path / "report"
    code = check_images.main(check_images.get_args_parser().parse_args(
        ["--img_path", str(folder), "--min_size", str(min_size), "--workers", "1", "--out", str(out), "--quiet"]))
    assert code == (1 if listed else 0)
    report = list(out.glob("*.csv"))
    rows = [r for p in report for r in csv.DictReader(open(p, newline=""))]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == listed


@pytest.mark.parametrize("flags,ok", [(("--batch_size", "1"), True), (("--batch_size", "0"), False),
                                      (("--num_workers", "0"), True), (("--num_workers", "-1"), False),
                                      (("--workers", "-1"), False)])
def test_test_py_batch_size_and_workers_at_their_edges(seven, tiny_ckpt, tmp_path, capsys, flags, ok):
    code = run_test(["--model", str(tiny_ckpt), "--test_images", str(seven), "--predictions", str(tmp_path / "out"), *flags])
    assert code == (0 if ok else 2)
    if not ok:
        assert "--batch_size must be >= 1 and --num_workers >= 0" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()  # refused before anything was written
