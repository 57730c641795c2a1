"""The reference's released checkpoint format (README, "Formats") loads unchanged, and test.py
scores with the preprocessing it was trained with."""
import csv

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import run_test
from model import build_model, default_model_args, load_for_inference

EXPECTED_KEYS = {f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for p in ("weight", "bias")}
EXPECTED_KEYS |= {"classifier.1.weight", "classifier.1.bias"}


@pytest.fixture(scope="module")
def released_state_dict():
    torch.manual_seed(0)
    model = build_model(default_model_args("vgg16"))
    state = model.state_dict()
    # Spread the head so the predicted distributions differ clearly between images.
    state["classifier.1.weight"] = state["classifier.1.weight"] * 200
    return state


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for n, (w, h) in enumerate([(320, 240), (240, 330), (300, 300)]):
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BICUBIC).save(folder / f"{1000 + n}.jpg", quality=90)
    return folder


def reference_scores(state, path):
    """An independent reimplementation of the reference's inference: shorter side to 256
    (bilinear), centre 224 crop, ToTensor in [0, 1] without normalisation, VGG16 features,
    flatten, Linear, softmax, then the mean and std loops."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    new = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - 224) / 2.0)), int(round((new[1] - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    features = torchvision.models.vgg16().features
    features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    with torch.no_grad():
        logits = features.eval()(x).reshape(1, -1) @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    p = torch.softmax(logits.double(), dim=1)[0].tolist()
    mean = sum((i + 1) * pi for i, pi in enumerate(p))
    std = sum(pi * (i + 1 - mean) ** 2 for i, pi in enumerate(p)) ** 0.5
    return mean, std


def test_vgg16_state_dict_has_the_released_layout(released_state_dict):
    assert set(released_state_dict) == EXPECTED_KEYS
    assert released_state_dict["classifier.1.weight"].shape == (10, 25088)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["zip", "legacy", "multi_gpu"])
def test_released_checkpoint_scores_like_the_reference(variant, released_state_dict, photos, tmp_path):
    state = dict(released_state_dict)
    if variant == "multi_gpu":  # the reference's --multi_gpu wrapped the conv base in DataParallel
        state = {k.replace("features.", "features.module.", 1): v for k, v in state.items()}
    ckpt = tmp_path / "epoch-82.pth"
    torch.save(state, ckpt, _use_new_zipfile_serialization=(variant != "legacy"))
    model, model_args = load_for_inference(ckpt)
    assert model_args["normalize"] == "none" and model_args["image_size"] == 224 and model_args["resize_size"] == 256

    out = tmp_path / "pred"
    assert run_test(["--model", ckpt, "--test_images", photos, "--predictions", out, "--workers", "0", "--quiet",
                     "--amp", "off"]) == 0  # exact float32 (bf16 is auto for VGG16 on some CPUs): compared to 1e-4
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["image_id"] for r in rows] == ["1000.jpg", "1001.jpg", "1002.jpg"]
    means = []
    for row in rows:
        mean, std = reference_scores(released_state_dict, photos / row["image_id"])
        assert abs(float(row["mean"]) - mean) < 1e-4 and abs(float(row["std"]) - std) < 1e-4
        means.append(mean)
    assert max(means) - min(means) > 0.01  # the check compares distinct predictions


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"weird": object()}, path)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "img" / "a.jpg")
    assert run_test(["--model", path, "--test_images", tmp_path / "img", "--predictions", tmp_path / "o", "--quiet"]) == 2
    assert "refused" in capsys.readouterr().err
