"""Test-time augmentation takes the crops it promises: the centre, the four corners, then
the same five mirrored left-right, checked against crops cut by hand with PIL and numpy
(not with torchvision's crop functions), both as tensors and as the scores test.py writes."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hand_crops, run_test, tiny_checkpoint, to_input
from dataset import TTACrops
from model import build_model, default_model_args

@pytest.fixture(scope="module")
def noise_images(tmp_path_factory):
    """Lossless noise (so no two crops or mirrors coincide) in a landscape and a portrait
    shape whose centre offsets are odd (banker's rounding matters) and a square one."""
    folder = tmp_path_factory.mktemp("tta")
    rng = np.random.default_rng(7)
    for name, (w, h) in {"land.png": (53, 47), "port.png": (41, 61), "square.png": (40, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize("normalize", ["none", "imagenet"])
def test_tta_crops_are_centre_corners_then_their_left_right_mirrors(noise_images, normalize):
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40, normalize=normalize)
    for path in sorted(noise_images.iterdir()):
        expected = torch.stack([to_input(c, normalize) for c in hand_crops(path, 40, 32)])
        assert len({c.numpy().tobytes() for c in expected}) == 10, path.name  # ten different crops
        for n in (1, 5, 6, 10):
            with Image.open(path) as img:
                got = TTACrops(model_args, n)(img.convert("RGB"))
            assert got.shape == (n, 3, 32, 32)
            for k in range(n):
                assert torch.allclose(got[k], expected[k], atol=1e-5), f"{path.name}: crop {k} of {n}"


def test_test_py_tta_averages_the_model_over_the_hand_cut_crops(noise_images, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", seed=2)
    saved = torch.load(ckpt, weights_only=True)
    model_args = saved["model_args"]
    model = build_model(model_args)
    model.load_state_dict(saved["model"])
    model.eval()
    out = tmp_path / "pred"
    assert run_test(["--model", ckpt, "--test_images", noise_images, "--predictions", out, "--workers", "0",
                     "--quiet", "--tta", "10", "--amp", "off"]) == 0  # exact float32: the parity checked below
    with open(out / "predictions.csv", newline="") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["land.png", "port.png", "square.png"]
    for name, row in rows.items():
        crops = torch.stack([to_input(c, model_args["normalize"])
                             for c in hand_crops(noise_images / name, model_args["resize_size"], model_args["image_size"])])
        with torch.no_grad():
            expected = model(crops).double().mean(0).numpy()  # the mean of the ten distributions
        written = np.array([float(row[f"p{k}"]) for k in range(1, 11)])
        assert np.allclose(written, expected, atol=2e-6), name  # the CSV keeps 6 decimals
        assert float(row["mean"]) == pytest.approx(float((np.arange(1, 11) * expected).sum()), abs=2e-6)
