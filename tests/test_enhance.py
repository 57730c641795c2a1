"""tools/enhance.py and engine/explain/enhance.py with a model that demonstrably prefers brighter
photos: the score goes up, brightness goes up, every setting stays in its bounds, the
output keeps the photo's size, and a brightness sweep's scores rise with brightness."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from engine.explain.enhance import PARAMS, apply_full, apply_params, enhance, photo_grey, score_image
from engine.explain.pixels import image_to_tensor, tensor_to_image
from model import build_model, default_model_args, load_for_inference, save_checkpoint
from tools import enhance as enhance_cli

SIZE = (120, 90)


def bright_checkpoint(path, slope=2.0):
    """tiny_cnn with hand-set weights: every conv filter averages its input (all weights
    1 / (in_channels x 9), batch norm the identity), so the pooled feature f is a
    positive-weighted average of the crop's pixels (input in [0, 1]: normalize 'none');
    the head's logits are slope * (k - 5.5) * f for rating k, so the predicted mean rises
    strictly with f, i.e. with every pixel's brightness. slope 0: a constant model."""
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40, normalize="none")
    model = build_model(model_args)
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / (m.in_channels * 9))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_(), m.running_var.fill_(1.0), m.weight.fill_(1.0), m.bias.zero_()
        head = model.classifier[-2]
        head.weight.copy_((torch.arange(1, 11.0) - 5.5)[:, None].repeat(1, head.in_features) * slope / head.in_features)
        head.bias.zero_()
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args})
    return path


def dark_photo(path, seed=0):
    """A smooth, darkened photo-like image (gradients and blobs at 35% brightness)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]] / 40.0
    base = np.stack([np.sin(x + rng.uniform(0, 6)) + np.cos(y * 1.3 + rng.uniform(0, 6)) for _ in range(3)], -1)
    pixels = ((base - base.min()) / (base.max() - base.min()) * 0.35 * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhance")
    return {"root": root, "ckpt": bright_checkpoint(root / "bright.pth"), "flat": bright_checkpoint(root / "flat.pth", 0.0),
            "photo": dark_photo(root / "dark.png")}


def run(*argv):
    return enhance_cli.main(enhance_cli.get_args_parser().parse_args([str(a) for a in argv] + ["--device", "cpu", "--quiet"]))


def test_enhance_raises_score_and_brightness(setup, tmp_path):
    out = tmp_path / "out"
    assert run("--model", setup["ckpt"], "--image", setup["photo"], "--out", out, "--steps", "12") == 0
    record = json.loads((out / "enhance.json").read_text())
    assert record["raised"] and record["note"] == ""
    assert record["score_after"] > record["score_before"] + 0.2
    assert record["params"]["brightness"] > 1.1
    for name, value in record["params"].items():
        lo, _, hi = PARAMS[name]
        assert lo <= value <= hi and record["bounds"][name] == {"lower": lo, "neutral": PARAMS[name][1], "upper": hi}
    assert len(record["history"]) == 13 and record["history"][record["best_step"]] == max(record["history"])
    # The full-size JPEG scores close to what the optimiser saw on the model's crop.
    assert record["score_after"] == pytest.approx(max(record["history"]), abs=0.1)
    with Image.open(out / "enhanced.jpg") as img:
        assert img.size == SIZE and img.format == "JPEG"
        assert np.asarray(img).mean() > np.asarray(Image.open(setup["photo"])).mean() + 10
    with Image.open(out / "before_after.png") as img:
        assert img.size == (800, 360)


def test_bounds_hold_at_any_learning_rate(setup, tmp_path):
    out = tmp_path / "out"
    assert run("--model", setup["ckpt"], "--image", setup["photo"], "--out", out, "--params", "brightness,gamma",
               "--steps", "4", "--lr", "50") == 0
    params = json.loads((out / "enhance.json").read_text())["params"]
    assert set(params) == {"brightness", "gamma"}
    assert params["brightness"] == pytest.approx(PARAMS["brightness"][2], abs=1e-3)  # pushed to its upper bound
    assert PARAMS["gamma"][0] <= params["gamma"] <= PARAMS["gamma"][2]


def test_sweep_scores_rise_with_brightness(setup, tmp_path):
    out = tmp_path / "out"
    assert run("--model", setup["ckpt"], "--image", setup["photo"], "--out", out, "--sweep", "brightness", "--steps", "5") == 0
    record = json.loads((out / "sweep_brightness.json").read_text())
    lo, neutral, hi = PARAMS["brightness"]
    assert record["values"] == pytest.approx([lo, (lo + neutral) / 2, neutral, (neutral + hi) / 2, hi])
    scores = record["scores"]
    assert all(b > a for a, b in zip(scores, scores[1:]))
    with Image.open(out / "sweep_brightness.png") as img:
        assert img.size == (1000, 210)


def test_unraisable_score_leaves_the_photo_unchanged(setup, tmp_path):
    out = tmp_path / "out"
    assert run("--model", setup["flat"], "--image", setup["photo"], "--out", out, "--steps", "3") == 0
    record = json.loads((out / "enhance.json").read_text())
    assert not record["raised"] and "unchanged" in record["note"]
    assert record["score_after"] == pytest.approx(record["score_before"], abs=1e-6)
    assert all(v == PARAMS[k][1] for k, v in record["params"].items())
    original = np.asarray(Image.open(setup["photo"]).convert("RGB"), dtype=float)
    written = np.asarray(Image.open(out / "enhanced.jpg"), dtype=float)
    assert written.shape == original.shape and np.abs(written - original).mean() < 2  # JPEG's rounding only


def test_folder_with_a_broken_file(setup, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    dark_photo(photos / "a.png", 1)
    dark_photo(photos / "sub" / "b.png", 2)
    (photos / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert run("--model", setup["ckpt"], "--image", photos, "--out", out, "--steps", "2") == 1
    # One folder per photo, named without the photo's extension (a.png -> a, not a.png).
    assert sorted(p.name for p in out.iterdir()) == ["a", "sub_b"]
    for sub in ("a", "sub_b"):
        assert {p.name for p in (out / sub).iterdir()} == {"enhanced.jpg", "before_after.png", "enhance.json"}
    err = capsys.readouterr().err
    assert "broken.jpg" in err and f"1 of 3 photos failed; the other 2 are written under {out}" in err
    # One photo written beside the broken one: "the other", not "the others".
    (photos / "sub" / "b.png").unlink()
    assert run("--model", setup["ckpt"], "--image", photos, "--out", tmp_path / "out2", "--steps", "2") == 1
    assert f"1 of 2 photos failed; the other is written under {tmp_path / 'out2'}" in capsys.readouterr().err
    # Every photo broken.
    (photos / "a.png").unlink()
    (photos / "sub" / "c.jpg").write_bytes(b"not an image either")
    assert run("--model", setup["ckpt"], "--image", photos, "--out", tmp_path / "out4", "--steps", "2") == 1
    assert f"2 of 2 photos failed; none is written under {tmp_path / 'out4'}" in capsys.readouterr().err
    # A single broken photo: its own error line, no summary about other photos.
    assert run("--model", setup["ckpt"], "--image", photos / "broken.jpg", "--out", tmp_path / "out3") == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "other" not in err and "failed;" not in err


@pytest.mark.parametrize("argv,flag", [(["--params", "brightness,glow"], "--params"), (["--steps", "1", "--sweep", "gamma"], "--steps"),
                                      (["--lr", "0"], "--lr"), (["--quality", "100"], "--quality")])
def test_bad_usage(setup, tmp_path, capsys, argv, flag):
    assert run("--model", setup["ckpt"], "--image", setup["photo"], "--out", tmp_path / "out", *argv) == 2
    assert flag in capsys.readouterr().err
    assert run("--model", setup["ckpt"], "--image", tmp_path / "missing.jpg", "--out", tmp_path / "out") == 2
    assert run("--model", tmp_path / "missing.pth", "--image", setup["photo"], "--out", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


def grey_levels(a, b) -> float:
    return float((image_to_tensor(a) if isinstance(a, Image.Image) else a).sub(
        image_to_tensor(b) if isinstance(b, Image.Image) else b).abs().mean() * 255)


@pytest.mark.parametrize("values", [{"contrast": 1.4, "saturation": 1.5}, {"sharpness": 1.5}])
def test_full_resolution_matches_the_model_resolution(values):
    """The settings do at full size what they did at the model's scale: a 480 x 360 photo
    enhanced, then resized to the model's 53 x 40, equals (within a few percent of the
    effect) the resized photo enhanced. For sharpness the photo has detail at the model's
    scale (a period of 4 model pixels), and a blur of one full-size pixel instead of one
    model pixel would sharpen almost nothing there."""
    model_args = {"resize_size": 40, "image_size": 32}
    y, x = np.mgrid[0:360, 0:480]
    pattern = 0.5 + 0.25 * (np.sin(2 * np.pi * x / 36) * np.sin(2 * np.pi * y / 45))[..., None] + 0.1 * np.cos(x / 70.0)[..., None] * [1, 0, -1]
    big = Image.fromarray((np.clip(pattern, 0, 1) * 255).astype(np.uint8))
    small = big.resize((53, 40), Image.Resampling.BILINEAR)
    expected = apply_params(image_to_tensor(small), values, photo_grey(big))
    full = apply_full(big, values, model_args).resize(small.size, Image.Resampling.BILINEAR)
    effect = grey_levels(small, expected)
    assert effect > 5 and grey_levels(full, expected) < 0.1 * effect
    if "sharpness" in values:
        naive = apply_params(image_to_tensor(big), values, photo_grey(big), model_pixel=1.0)
        naive = tensor_to_image(naive).resize(small.size, Image.Resampling.BILINEAR)
        assert grey_levels(naive, expected) > 0.8 * effect


def test_enhance_function_starts_neutral(setup):
    model, model_args = load_for_inference(setup["ckpt"])
    rgb = Image.open(setup["photo"]).convert("RGB")
    found = enhance(model, model_args, rgb, ["brightness"], 3, 0.2, torch.device("cpu"))
    assert found["history"][0] == pytest.approx(score_image(model, model_args, rgb, "cpu"), abs=1e-5)
    assert found["history"] == sorted(found["history"]) and found["raised"]


@pytest.mark.gpu
def test_cuda_finds_what_the_cpu_finds(setup, tmp_path):
    records = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        argv = ["--model", setup["ckpt"], "--image", setup["photo"], "--out", out, "--steps", "6", "--quiet"]
        assert enhance_cli.main(enhance_cli.get_args_parser().parse_args([str(a) for a in argv] + ["--device", device])) == 0
        records.append(json.loads((out / "enhance.json").read_text()))
    assert records[1]["raised"] and records[1]["score_after"] == pytest.approx(records[0]["score_after"], abs=0.02)
    for name, value in records[1]["params"].items():
        assert value == pytest.approx(records[0]["params"][name], abs=0.02)
