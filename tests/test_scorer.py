"""The notebook API gives the numbers test.py writes, for paths and PIL images alike."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hand_crops, make_photo_folder, run_test, tiny_checkpoint, to_input
from dataset import ImageReadError
from engine.score.scorer import Score, Scorer
from model import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer")
    valid, _ = make_photo_folder(root / "photos")
    return {"root": root, "photos": root / "photos", "valid": valid, "ckpt": tiny_checkpoint(root / "tiny.pth", seed=3)}


def rows_from_test_py(setup, out, tta):
    assert run_test(["--model", setup["ckpt"], "--test_images", setup["photos"], "--predictions", out,
                     "--workers", "0", "--quiet", "--tta", tta]) == 1  # the broken files
    with open(out / "predictions.csv", newline="") as f:
        return {r["image_id"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("tta", [1, 10])
def test_scorer_equals_test_py(setup, tmp_path, tta):
    rows = rows_from_test_py(setup, tmp_path / "out", tta)
    scorer = Scorer.from_checkpoint(setup["ckpt"], device="cpu", tta=tta, batch_size=4)
    paths = [setup["photos"] / rel for rel in setup["valid"]]
    scores = scorer.score(paths)
    assert len(scores) == len(setup["valid"]) == len(rows)
    for rel, s in zip(setup["valid"], scores):
        row = rows[rel]
        assert isinstance(s, Score) and len(s.distribution) == 10
        assert s.mean == pytest.approx(float(row["mean"]), abs=1e-6)
        assert s.std == pytest.approx(float(row["std"]), abs=1e-6)
        assert np.allclose(s.distribution, [float(row[f"p{k}"]) for k in range(1, 11)], atol=1e-6)
        assert sum(s.distribution) == pytest.approx(1.0, abs=1e-5)


def test_single_input_pil_image_and_errors(setup):
    scorer = Scorer.from_checkpoint(setup["ckpt"], device="cpu")
    photos = setup["photos"]
    for rel in ("k_exif6.jpg", "j_animated.gif"):  # EXIF rotation and first frame, as from a file
        path = photos / "sub" / rel
        one = scorer.score(path)
        assert isinstance(one, Score)
        with Image.open(path) as img:
            from_pil = scorer.score(img)
        assert from_pil.mean == pytest.approx(one.mean, abs=1e-9)
        assert np.allclose(from_pil.distribution, one.distribution, atol=1e-9)
    with Image.open(photos / "f_16bit.png") as img:  # in-memory I;16 becomes RGB the same way
        assert scorer.score(img).mean == pytest.approx(scorer.score(str(photos / "f_16bit.png")).mean, abs=1e-9)
    many = scorer.score((photos / "a_rgb.jpg", photos / "i.bmp"))
    assert [s.mean for s in many] == pytest.approx([scorer.score(photos / "a_rgb.jpg").mean,
                                                    scorer.score(photos / "i.bmp").mean], abs=1e-6)
    assert scorer.score([]) == []
    with pytest.raises(ImageReadError, match="zero.jpg: zero-byte file"):
        scorer.score([photos / "a_rgb.jpg", photos / "sub" / "broken" / "zero.jpg"])
    with pytest.raises(TypeError, match="PIL images or paths"):
        scorer.score(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="tta must be between 1 and 10"):
        Scorer.from_checkpoint(setup["ckpt"], device="cpu", tta=11)


def test_tta_batches_count_crops(setup):
    """--batch_size / batch_size bound the network's input: under TTA 10, 64 images would be
    640 crops in one VGG16 pass (killed for memory on a 23 GB machine)."""
    scorer = Scorer.from_checkpoint(setup["ckpt"], device="cpu", tta=10, batch_size=20)
    seen = []
    handle = scorer.model.register_forward_pre_hook(lambda _m, inputs: seen.append(len(inputs[0])))
    try:
        scorer.score([setup["photos"] / rel for rel in setup["valid"][:5]])
    finally:
        handle.remove()
    assert seen == [20, 20, 10]  # 2 + 2 + 1 images of 10 crops


def test_scorer_scores_the_centre_crop_cut_by_hand(setup, tmp_path):
    """Independent of test.py (which shares the Scorer's code): the distribution is the
    model's output on a centre crop cut with PIL and numpy, and mean and std are that
    distribution's, computed here."""
    path = tmp_path / "odd.png"  # resized (shorter side 45 -> 40) and an odd centre offset
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(path)
    saved = torch.load(setup["ckpt"], weights_only=True)
    model = build_model(saved["model_args"])
    model.load_state_dict(saved["model"])
    model.eval()
    scorer = Scorer.from_checkpoint(setup["ckpt"], device="cpu", amp="off")  # exact float32: bf16 is auto on some CPUs
    for image in (path, setup["photos"] / "a_rgb.jpg"):
        with torch.no_grad():
            crop = hand_crops(image, saved["model_args"]["resize_size"], saved["model_args"]["image_size"])[0]
            expected = model(to_input(crop, saved["model_args"]["normalize"])[None])[0].double().numpy()
        s = scorer.score(image)
        assert np.allclose(s.distribution, expected, atol=1e-6), image.name
        mean = float((np.arange(1, 11) * expected).sum())
        assert s.mean == pytest.approx(mean, abs=1e-6)
        assert s.std == pytest.approx(float(np.sqrt((expected * (np.arange(1, 11) - mean) ** 2).sum())), abs=1e-6)


def test_an_in_memory_image_that_cannot_be_transformed_is_an_image_read_error():
    import torch
    from PIL import Image

    from dataset import ImageReadError
    from engine.runtime import Runtime
    from engine.score.scorer import Scorer
    from model import build_model, default_model_args
    args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    scorer = Scorer(build_model(args).eval(), args, Runtime(torch.device("cpu"), show_progress=False))
    with pytest.raises(ImageReadError, match="Image .*cannot be transformed: ZeroDivisionError"):
        scorer.score(Image.new("RGB", (0, 0)))
    assert 1 <= scorer.score(Image.new("RGB", (1, 500))).mean <= 10  # thin, but usable
