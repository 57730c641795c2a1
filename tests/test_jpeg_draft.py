"""JPEG draft decoding (dataset.images.draft): a large JPEG is decoded already reduced by
1/2, 1/4 or 1/8, never below the model's resize size, wherever photos are decoded for the
model, and --exact_decode (exact_decode=True) keeps the full-size path and its parity.
What it costs in scores is bounded in tests/test_cpu_precision.py."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.ava_like import PHOTOS, camera_frame, camera_like_jpegs
from conftest import EXIF_ORIENTATION, hand_crops, read_rows, run_test, tiny_checkpoint, to_input
from dataset import ImageDataset, eval_transform
from dataset import images
from dataset.images import load_rgb, read_rgb, upright_rgb
from engine.score.scorer import Scorer
from model import build_model

SIDE = 64


def smooth_jpeg(path, size, exif=None):
    """A smooth JPEG of `size`: a colour ramp (no noise, so that reduced and full decodes
    compare pixel for pixel)."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    pixels = np.stack([x * 255, y * 255, (1 - x) * 128 + y * 64], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=92, **({"exif": exif} if exif else {}))
    return path


# (stored size, size once drafted for a resize to 64, with the 512-pixel floor lifted): the
# factor is the largest of 8, 4, 2, 1 that keeps min(width, height) / factor >= 2 x 64
# (dataset.images.DRAFT_MARGIN), rounded up.
DRAFTS = [
    ((200, 127), (200, 127)),    # far below: decoded at full size
    ((300, 255), (300, 255)),    # shorter side one below 4 x 64: full size
    ((512, 256), (256, 128)),    # exactly 4 x 64: halved, to exactly 2 x 64
    ((511, 256), (256, 128)),    # an odd width rounds up
    ((600, 511), (300, 256)),    # one below 8 x 64: halved only
    ((1024, 512), (256, 128)),   # exactly 8 x 64: a quarter
    ((1200, 1023), (300, 256)),  # one below 16 x 64: a quarter only
    ((2048, 1024), (256, 128)),  # exactly 16 x 64: an eighth, the most libjpeg does
    ((4000, 2200), (500, 275)),  # far above: still an eighth
    ((256, 512), (128, 256)),    # portrait
]


@pytest.mark.parametrize("stored, drafted", DRAFTS, ids=[f"{w}x{h}" for (w, h), _ in DRAFTS])
def test_draft_reduces_by_the_largest_factor_that_keeps_the_resize_size(tmp_path, monkeypatch, stored, drafted):
    monkeypatch.setattr(images, "DRAFT_MIN_SIDE", 0)  # the margin's arithmetic alone, on small files
    path = smooth_jpeg(tmp_path / "a.jpg", stored)
    assert load_rgb(path, draft_side=SIDE).size == drafted
    assert min(load_rgb(path, draft_side=SIDE).size) >= 2 * SIDE or load_rgb(path, draft_side=SIDE).size == stored
    assert load_rgb(path).size == stored                      # no draft_side: full size
    assert load_rgb(path, draft_side=None).size == stored
    with open(path, "rb") as f:                               # a file object (a tar member, an upload) as a path
        assert load_rgb(io.BytesIO(f.read()), draft_side=SIDE).size == drafted


@pytest.mark.parametrize("side, stored, drafted", [
    (64, (1200, 1023), (1200, 1023)),   # 2 x 64 would allow a quarter; the floor of 512 allows nothing
    (64, (2048, 1024), (1024, 512)),    # exactly 2 x 512: halved, to the floor
    (256, (2048, 1024), (1024, 512)),   # VGG16: 2 x 256 is the floor itself
    (256, (4000, 3000), (1000, 750)),   # a 12-megapixel photo: a quarter
    (300, (4000, 3000), (1000, 750)),   # 2 x 300 = 600 above the floor: 3000 // 600 = 5, a quarter
    (300, (4000, 2000), (2000, 1000)),  # 2000 // 600 = 3: halved only
])
def test_draft_keeps_the_shorter_side_at_least_512_and_twice_the_resize(tmp_path, side, stored, drafted):
    path = smooth_jpeg(tmp_path / "a.jpg", stored)
    assert load_rgb(path, draft_side=side).size == drafted


def test_draft_leaves_other_formats_and_decoded_images_alone(tmp_path):
    big = Image.new("RGB", (1024, 512), (200, 100, 50))
    for fmt in ("PNG", "WEBP", "BMP"):
        path = tmp_path / f"a.{fmt.lower()}"
        big.save(path, fmt)
        assert load_rgb(path, draft_side=SIDE).size == (1024, 512), fmt
    path = smooth_jpeg(tmp_path / "b.jpg", (1024, 512))
    with Image.open(path) as img:  # already decoded (the Scorer takes PIL images): nothing to reduce
        img.load()
        assert upright_rgb(img, SIDE).size == (1024, 512)


def test_draft_then_exif_orientation(tmp_path, monkeypatch):
    """Stored 512 x 256 with orientation 6 (shown 256 x 512): halved in the stored frame,
    then turned upright."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    monkeypatch.setattr(images, "DRAFT_MIN_SIDE", 0)
    path = smooth_jpeg(tmp_path / "r.jpg", (512, 256), exif.tobytes())
    assert load_rgb(path).size == (256, 512)
    assert load_rgb(path, draft_side=SIDE).size == (128, 256)


def test_draft_keeps_the_pixels_on_real_photographs(tmp_path):
    """The model's crop from a drafted decode against the exact one, on the real
    photographs upscaled to 12 megapixels (bench/ava_like.py): measured 0.14 to 0.31 grey
    levels on average at VGG16's 256 / 224 (0.20 over the 9); held under 0.4 on average
    and 0.6 for each."""
    paths = camera_like_jpegs(tmp_path / "cam", 9)
    args = {"resize_size": 256, "image_size": 224, "normalize": "none"}
    diffs = []
    for path in paths:
        exact = eval_transform(args)(load_rgb(path))
        drafted = eval_transform(args)(load_rgb(path, draft_side=256))
        diffs.append(float((exact - drafted).abs().mean()) * 255)
    assert max(diffs) < 0.6 and np.mean(diffs) < 0.4, diffs
    assert min(diffs) > 0  # the draft did take effect


def test_the_dataset_drafts_to_its_transform_resize_size(tmp_path):
    path = smooth_jpeg(tmp_path / "a.jpg", (2048, 1536))
    transform = eval_transform({"resize_size": 72, "image_size": 64, "normalize": "none"})
    drafted = ImageDataset([path], transform, draft=True)
    exact = ImageDataset([path], transform)
    assert drafted.draft_side == 72 and exact.draft_side is None
    a, b = drafted[0]["image"], exact[0]["image"]
    assert a.shape == b.shape == (3, 64, 64)
    assert 0 < float((a - b).abs().mean()) * 255 < 1.0
    # The exact path is the hand-made crop to the last bit.
    assert torch.equal(b, to_input(hand_crops(path, 72, 64)[0], "none"))
    rgb, _ = read_rgb(path, draft_side=72)
    assert rgb.size == (1024, 768)  # 1536 // max(2 x 72, 512) = 3: halved


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory):
    """Three camera-like JPEGs at 1600 x 1200, and a tiny_cnn checkpoint at 32 px (resize 40)."""
    root = tmp_path_factory.mktemp("draft")
    folder = root / "photos"
    folder.mkdir()
    for n, name in enumerate(("china.jpg", "flower.jpg", "rocket.jpg")):
        camera_frame(f"{PHOTOS}/{name}", n, (1600, 1200)).save(folder / f"p{n}.jpg", "JPEG", quality=92)
    return {"folder": folder, "ckpt": tiny_checkpoint(root / "tiny.pth")}


def hand_scores(ckpt, paths):
    saved = torch.load(ckpt, weights_only=True)
    model = build_model(saved["model_args"])
    model.load_state_dict(saved["model"])
    model.eval()
    args = saved["model_args"]
    with torch.no_grad():
        return {p.name: model(to_input(hand_crops(p, args["resize_size"], args["image_size"])[0], args["normalize"])[None])[0]
                .double().numpy() for p in paths}


def test_test_py_drafts_by_default_and_exact_decode_keeps_parity(big_photos, tmp_path, capsys):
    paths = sorted(big_photos["folder"].glob("*.jpg"))
    expected = hand_scores(big_photos["ckpt"], paths)
    runs = {}
    for name, extra in (("draft", []), ("exact", ["--exact_decode"])):
        out = tmp_path / name
        assert run_test(["--model", big_photos["ckpt"], "--test_images", big_photos["folder"], "--predictions", out,
                         "--device", "cpu", "--amp", "off", "--quiet", *extra]) == 0
        printed = capsys.readouterr().out
        assert ("JPEG draft decoding" if name == "draft" else "exact decoding") in printed, printed
        runs[name] = {r["image_id"]: np.array([float(r[f"p{k}"]) for k in range(1, 11)]) for r in read_rows(out)}
    for image_id, dist in expected.items():
        assert np.allclose(runs["exact"][image_id], dist, atol=1e-5), image_id   # float32 parity, full decode
        assert not np.allclose(runs["draft"][image_id], dist, atol=1e-7), image_id  # the draft did take effect
        assert np.abs(runs["draft"][image_id] - dist).max() < 0.01, image_id


def test_the_scorer_and_the_service_draft_as_test_py(big_photos):
    from serving import decoding
    path = sorted(big_photos["folder"].glob("*.jpg"))[0]
    drafted = Scorer.from_checkpoint(big_photos["ckpt"], device="cpu", amp="off")
    exact = Scorer.from_checkpoint(big_photos["ckpt"], device="cpu", amp="off", exact_decode=True)
    assert drafted.draft_side == 40 and exact.draft_side is None
    expected = hand_scores(big_photos["ckpt"], [path])[path.name]
    assert np.allclose(exact.score(path).distribution, expected, atol=1e-5)
    assert not np.allclose(drafted.score(path).distribution, expected, atol=1e-7)
    # The service's decoding processes run decode_in_worker with the Scorer's draft_side.
    data = path.read_bytes()
    for scorer in (drafted, exact):
        saved = dict(decoding._worker)
        decoding._worker.update(transform=scorer.transform, resize_size=40, max_pixels=10 ** 9,
                                draft_side=scorer.draft_side)
        try:
            array, kind, reason = decoding.decode_in_worker(data)
        finally:
            decoding._worker.clear()
            decoding._worker.update(saved)
        assert kind == "" and reason == ""
        expected_input = scorer.preprocess(load_rgb(path, draft_side=scorer.draft_side))
        assert torch.equal(torch.from_numpy(array), expected_input)
