"""The reference implementation released two VGG16 state_dicts with the same keys: its
2018-2020 one (epoch-82.pth, inputs in [0, 1], no normalisation) and its June 2021 one
(epoch-34.pth, ImageNet mean/std). --normalize chooses; without it 'none' is assumed
with a one-line note, and every output records the choice."""
import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import hubconf
from conftest import run_test
from engine.score.scorer import Scorer
from model import build_model, default_model_args
from tools import export

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet statistics, written out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(1)
    state = build_model(default_model_args("vgg16")).state_dict()
    state["classifier.1.weight"] = state["classifier.1.weight"] * 200  # distinct distributions per image
    path = tmp_path_factory.mktemp("released") / "epoch-34.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for n, (w, h) in enumerate([(300, 250), (250, 320)]):
        pixels = rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BICUBIC).save(folder / f"{200 + n}.jpg", quality=92)
    return folder


def pipeline_2021(state, path, normalize: bool):
    """The reference's test-time pipeline, reimplemented from its description: shorter
    side to 256 (bilinear), centre 224 crop, ToTensor, and (2021) ImageNet Normalize."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    new = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - 224) / 2.0)), int(round((new[1] - 224) / 2.0))
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1)
    if normalize:
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    features = torchvision.models.vgg16().features
    features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    with torch.no_grad():
        logits = features.eval()(x[None]).reshape(1, -1) @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    p = torch.softmax(logits.double(), dim=1)[0].numpy()
    mean = float((np.arange(1, 11) * p).sum())
    return mean, float(np.sqrt((p * (np.arange(1, 11) - mean) ** 2).sum()))


def scored(folder):
    with open(folder / "predictions.csv") as f:
        return {r["image_id"]: (float(r["mean"]), float(r["std"])) for r in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("flag", [None, "imagenet", "none"])
def test_test_py_matches_the_pipeline_of_the_chosen_release(released, photos, tmp_path, capsys, flag):
    path, state = released
    out = tmp_path / "out"
    argv = ["--model", path, "--test_images", photos, "--predictions", out, "--workers", "0", "--quiet", "--device", "cpu",
            "--amp", "off"]  # exact float32 (bf16 is auto for VGG16 on some CPUs): the pipelines are compared to 1e-4
    assert run_test(argv + (["--normalize", flag] if flag else [])) == 0
    err = capsys.readouterr().err
    # The note, once, only when nothing was said; it names both releases.
    assert err.count("assumed --normalize none") == (1 if flag is None else 0)
    if flag is None:
        assert "epoch-82.pth" in err and "epoch-34.pth" in err and "--normalize imagenet" in err
    got = scored(out)
    for name in ("200.jpg", "201.jpg"):
        mean, std = pipeline_2021(state, photos / name, normalize=flag == "imagenet")
        assert got[name][0] == pytest.approx(mean, abs=1e-4) and got[name][1] == pytest.approx(std, abs=1e-4)


@pytest.mark.slow
def test_the_two_normalisations_give_different_scores(released, photos, tmp_path):
    """Guards the test above: if the flag changed nothing, both pipelines would agree."""
    path, state = released
    a = pipeline_2021(state, photos / "200.jpg", normalize=True)
    b = pipeline_2021(state, photos / "200.jpg", normalize=False)
    assert abs(a[0] - b[0]) > 1e-3


# Two images: scipy rightly warns that their predicted spreads are nearly constant.
@pytest.mark.filterwarnings("ignore::scipy.stats.NearConstantInputWarning")
def test_metrics_json_records_the_normalisation(released, photos, tmp_path):
    path, _ = released
    labels = tmp_path / "labels.csv"
    labels.write_text("200,1,2,3,4,5,6,7,8,9,10\n201,10,9,8,7,6,5,4,3,2,1\n")
    out = tmp_path / "out"
    assert run_test(["--model", path, "--test_csv", labels, "--test_images", photos, "--predictions", out,
                     "--workers", "0", "--quiet", "--normalize", "imagenet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["model_args"]["normalize"] == "imagenet"


@pytest.mark.slow
def test_scorer_hub_and_export_take_the_choice(released, photos, tmp_path):
    path, state = released
    mean, std = pipeline_2021(state, photos / "201.jpg", normalize=True)
    s = Scorer.from_checkpoint(path, device="cpu", normalize="imagenet", amp="off").score(str(photos / "201.jpg"))
    assert s.mean == pytest.approx(mean, abs=1e-4) and s.std == pytest.approx(std, abs=1e-4)
    model = hubconf.nima(checkpoint=str(path), normalize="imagenet")
    assert model.model_args["normalize"] == "imagenet"
    out = tmp_path / "nima.pt"
    args = export.get_args_parser().parse_args(["--model", str(path), "--format", "torchscript", "--out", str(out),
                                               "--normalize", "imagenet"])
    assert export.main(args) == 0
    pre = json.loads((tmp_path / "nima.pt.json").read_text())
    assert pre["preprocessing"]["normalization"] == "imagenet" and pre["model_args"]["normalize"] == "imagenet"
    assert pre["preprocessing"]["normalize"] == {"mean": list(MEAN), "std": list(STD)}
