"""Heat maps (engine/explain/heatmaps.py): the peak lies where the score can change, the map has
the photo's size and is the same twice, every kind of backbone works, and test.py
--explain writes one readable picture per chosen image, with a CSV and with a folder."""
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import make_photo_folder, run_test, small_args, tiny_checkpoint
from dataset.transforms import eval_transform
from engine.explain.heatmaps import explain_image
from engine.explain.pixels import safe_name
from model import build_model, default_model_args, load_for_inference
from model.nima import NIMA

# A 100 x 80 photo, resized to a shorter side of 64 (80 x 64) and centre-cropped to 64:
# the crop starts 8 resized pixels from the left, and one resized pixel is 1.25 of the
# photo's. The region below, rows 8-24 and columns 40-56 of the crop, is therefore rows
# 10-30 and columns 60-80 of the photo (by hand: (8 + 40) * 1.25 = 60, (8 + 56) * 1.25 = 80).
PHOTO_SIZE = (100, 80)
REGION_CROP = (slice(8, 24), slice(40, 56))
REGION_PHOTO = (slice(10, 30), slice(60, 80))
CROP_COLUMNS_PHOTO = (10, 90)  # the crop's columns in the photo: 8 * 1.25 and (8 + 64) * 1.25


class RegionOnly(nn.Module):
    """Zeroes every pixel outside one region: nothing else can change the output."""

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[..., REGION_CROP[0], REGION_CROP[1]] = 1
        return x * mask


def region_network():
    torch.manual_seed(0)
    # No biases: outside the region every activation is exactly zero.
    features = nn.Sequential(RegionOnly(), nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU())
    model = NIMA(features, nn.AdaptiveAvgPool2d(1), 16, dropout=0.0).eval()
    with torch.no_grad():  # positive filters: activations grow towards the region's middle, not at an edge
        for conv in (features[1], features[3]):
            conv.weight.abs_()
    model_args = dict(default_model_args("tiny_cnn"), image_size=64, resize_size=64, normalize="none")
    return model, model_args


def photo(seed=0, size=PHOTO_SIZE):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("method", ["grad-cam", "gradient-x-input"])
def test_peak_lies_in_the_only_region_that_matters(method):
    model, model_args = region_network()
    heat, dist, info = explain_image(model, model_args, photo(), torch.device("cpu"), method=method)
    assert info["method"] == method
    assert heat.shape == (PHOTO_SIZE[1], PHOTO_SIZE[0]) and heat.dtype == np.float32
    assert np.abs(heat).max() > 0.5 and np.abs(heat).max() <= 1 + 1e-6
    peak = np.unravel_index(np.argmax(np.abs(heat)), heat.shape)
    assert REGION_PHOTO[0].start <= peak[0] < REGION_PHOTO[0].stop and REGION_PHOTO[1].start <= peak[1] < REGION_PHOTO[1].stop
    # Away from the region (beyond the convolutions' reach, the smoothing and the resize), nothing.
    margin = 10
    far = np.ones(heat.shape, bool)
    far[REGION_PHOTO[0].start - margin:REGION_PHOTO[0].stop + margin, REGION_PHOTO[1].start - margin:REGION_PHOTO[1].stop + margin] = False
    assert np.abs(heat[far]).max() < 1e-6
    assert dist.shape == (10,) and dist.sum() == pytest.approx(1.0, abs=1e-6)


def test_outside_the_crop_is_zero():
    """Pixels the centre crop leaves out cannot change the score: zero there, and the map
    covers the crop's columns of the photo."""
    model, model_args = region_network()
    model.features[0] = nn.Identity()  # now every pixel of the crop matters
    heat, _, _ = explain_image(model, model_args, photo(1), torch.device("cpu"), method="gradient-x-input")
    left, right = CROP_COLUMNS_PHOTO
    assert np.all(heat[:, :left - 1] == 0) and np.all(heat[:, right + 1:] == 0)
    assert np.count_nonzero(heat[:, left + 1:right - 1]) > 0.9 * heat[:, left + 1:right - 1].size


BACKBONES = [("tiny_cnn", "grad-cam", "features (4x4)"), ("vgg16", "grad-cam", "features.29 (2x2)"),
             ("mobilenet_v3_large", "grad-cam", "features (2x2)"),
             pytest.param("vit_b_32", "gradient-x-input", "input pixels", id="vit_b_32-224px")]


@pytest.mark.parametrize("name,method,layer", BACKBONES)
def test_every_kind_of_backbone_deterministic(name, method, layer):
    """The registry's CNNs (vgg16 at 32 px ends at 1 x 1, so its last map of 2 x 2 is
    taken: the ReLU before the last pooling) and a ViT at its fixed 224 px (vit_b_32: 49
    tokens, a quarter of vit_b_16's work for the same code path)."""
    torch.manual_seed(0)
    model_args = small_args(name)
    model = build_model(model_args).eval()
    img = photo(2, (90, 70))
    first, dist, info = explain_image(model, model_args, img)
    second, dist2, _ = explain_image(model, model_args, img)
    assert info["method"] == method and info["layer"].endswith(layer)
    assert first.shape == (70, 90) and np.isfinite(first).all() and np.abs(first).max() > 0
    assert np.array_equal(first, second) and np.array_equal(dist, dist2)
    # The distribution is the model's own prediction on the centre crop.
    with torch.no_grad():
        expected = model(eval_transform(model_args)(img)[None])[0].double().numpy()
    assert np.allclose(dist, expected, atol=1e-6)


def test_released_vgg16_layout(tmp_path):
    """The reference's release format (a bare VGG16 state_dict, 224 px, no normalisation):
    Grad-CAM on the last conv map before the last pooling, 14 x 14."""
    torch.manual_seed(0)
    torch.save(build_model(default_model_args("vgg16")).state_dict(), tmp_path / "epoch-82.pth")
    model, model_args = load_for_inference(tmp_path / "epoch-82.pth")
    heat, _, info = explain_image(model, model_args, photo(4, (320, 240)))
    assert info == {"method": "grad-cam", "layer": "features.29 (14x14)"} and model_args["normalize"] == "none"
    assert heat.shape == (240, 320) and np.abs(heat).max() > 0


@pytest.mark.gpu
def test_cuda_deterministic_and_close_to_cpu():
    torch.manual_seed(0)
    model_args = small_args("mobilenet_v3_large")
    model = build_model(model_args).eval()
    img = photo(5, (90, 70))
    on_cpu, dist_cpu, _ = explain_image(model, model_args, img)
    model = model.cuda()
    first, dist, _ = explain_image(model, model_args, img)
    second, _, _ = explain_image(model, model_args, img)
    assert np.array_equal(first, second)
    assert np.allclose(dist, dist_cpu, atol=1e-3) and np.abs(first - on_cpu).max() < 0.05


def test_safe_names():
    taken = set()
    assert safe_name("953844", taken) == "953844"
    assert safe_name("sub/a b.jpg", taken) == "sub_a_b"  # the caller adds its own extension
    other = safe_name("sub/a_b.jpg", taken)  # cleans to the same name: told apart by a hash
    assert other.startswith("sub_a_b-") and other != "sub_a_b"
    for bad in ("../../etc/passwd", ".hidden", "/", "a\\b:c*?", "x" * 500):
        name = safe_name(bad)
        assert name and "/" not in name and "\\" not in name and not name.startswith(".") and len(name) <= 120


def explain_files(out):
    return sorted(os.listdir(out / "explain"))


def predictions(out):
    with open(out / "predictions.csv", newline="") as f:
        return {r["image_id"]: float(r["mean"]) for r in csv.DictReader(f)}


def test_test_py_explain_with_a_csv(demo_data, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", seed=4)
    out = tmp_path / "pred"
    base = ["--model", ckpt, "--test_csv", demo_data / "test_labels.csv", "--test_images", demo_data / "images",
            "--predictions", out, "--workers", "0", "--quiet"]
    assert run_test(base + ["--explain", "all"]) == 0
    means = predictions(out)
    assert explain_files(out) == sorted(f"{i}.png" for i in means) and len(means) > 4
    # K = 2: the two highest and two lowest; the rerun leaves no picture of the first behind.
    assert run_test(base + ["--explain", "2"]) == 0
    ranked = sorted(means, key=lambda i: (-means[i], i))
    assert explain_files(out) == sorted(f"{i}.png" for i in ranked[:2] + ranked[-2:])
    for name in explain_files(out):
        with Image.open(out / "explain" / name) as img:
            img.load()
            assert img.size == (800, 460)


def test_test_py_explain_with_a_folder(tmp_path, capsys):
    valid, broken = make_photo_folder(tmp_path / "photos")
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", seed=5)
    out = tmp_path / "pred"
    # Ids with a folder in them ('sub/k_exif6.jpg') get a flat, safe file name.
    assert run_test(["--model", ckpt, "--test_images", tmp_path / "photos", "--predictions", out, "--workers", "0",
                     "--quiet", "--explain", "all"]) == 1  # the broken files, as without --explain
    assert explain_files(out) == sorted(safe_name(i) + ".png" for i in valid)
    assert "sub_k_exif6.png" in explain_files(out)  # one extension, not sub_k_exif6.jpg.png
    for name in explain_files(out):
        with Image.open(out / "explain" / name) as img:
            img.load()


@pytest.mark.parametrize("bad", ["-1", "two", "1.5"])
def test_test_py_explain_bad_values(tmp_path, capsys, bad):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    assert run_test(["--model", ckpt, "--test_images", tmp_path / "a.png", "--predictions", tmp_path / "out",
                     "--explain", bad]) == 2
    assert "--explain" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scorer_explain(tmp_path):
    from engine.score.scorer import Scorer
    scorer = Scorer.from_checkpoint(tiny_checkpoint(tmp_path / "tiny.pth", seed=6), device="cpu")
    img = photo(3, (61, 47))
    img.save(tmp_path / "p.png")
    heat, score = scorer.explain(tmp_path / "p.png")
    assert heat.shape == (47, 61) and np.abs(heat).max() > 0
    plain = scorer.score(tmp_path / "p.png")
    assert score.mean == pytest.approx(plain.mean, abs=1e-6) and np.allclose(score.distribution, plain.distribution, atol=1e-6)
    again, _ = scorer.explain(img)  # a PIL image gives the file's map
    assert np.array_equal(heat, again)


def test_heat_overlay_colours_by_hand():
    """The web page's heat map picture: where the map is 0 the photo in grey (Pillow's L,
    ITU-R 601-2 luma, by hand), at +1 and -1 RdBu_r's end colours (matplotlib's published
    #67001f and #053061) at opacity 0.75 over that grey, at 0.5 its colour there (#e48066)
    half as opaque."""
    from engine.explain.pictures import heat_overlay

    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 40
    heat = np.array([[0, 1, -1, 0.5, 2.0]] * 4, np.float32)  # 2.0: clipped to 1
    out = np.asarray(heat_overlay(Image.fromarray(rgb), heat)).astype(float)
    grey = (200 * 299 + 100 * 587 + 40 * 114) / 1000  # 123.06 -> Pillow rounds to 123
    red, blue = np.array([0x67, 0x00, 0x1F], float), np.array([0x05, 0x30, 0x61], float)
    assert out.shape == (4, 5, 3)
    assert np.abs(out[:, 0] - round(grey)).max() <= 1
    assert np.abs(out[:, 1] - (0.75 * red + 0.25 * round(grey))).max() <= 1
    assert np.abs(out[:, 2] - (0.75 * blue + 0.25 * round(grey))).max() <= 1
    assert np.abs(out[:, 4] - out[:, 1]).max() == 0
    light_red = np.array([0xE4, 0x80, 0x66], float)  # RdBu_r at 0.75, i.e. a map value of 0.5
    assert np.abs(out[:, 3] - (0.375 * light_red + 0.625 * round(grey))).max() <= 1
    with pytest.raises(ValueError, match="heat map 4x4 for an image of 5x4"):
        heat_overlay(Image.fromarray(rgb), heat[:, :4])
