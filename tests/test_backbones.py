"""Every curated backbone end to end (build, train step, predict, checkpoint round trip
through test.py), the paper head's key layout, the generic head on other torchvision
models, and the CLI's refusals."""
import csv
import shutil

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import hand_crops, run_main, run_test, small_args, tiny_train_args, to_input
from dataset import eval_transform, load_rgb
from model import build_model, default_model_args, emd_loss, list_backbones, load_for_inference, save_checkpoint
from model.registry import PretrainedWeightsError


def centre_crop_by_hand(path, model_args):
    """Evaluation preprocessing cut with PIL and numpy (see test_tta_crops): the first TTA
    crop is the centre crop."""
    crop = hand_crops(path, model_args["resize_size"], model_args["image_size"])[0]
    return to_input(crop, model_args["normalize"])


@pytest.fixture(scope="module")
def few_images(demo_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("few")
    for path in sorted((demo_data / "images").iterdir())[:2]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_end_to_end(name, few_images, tmp_path):
    torch.manual_seed(0)
    model_args = small_args(name)
    model = build_model(model_args, pretrained="none")
    size = model_args["image_size"]

    # The two learning-rate groups cover every parameter exactly once.
    groups = model.param_groups(0.01, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.classifier[-2].parameters()}
    # With distinct rates: the head's final Linear alone at the dense rate, the rest (every
    # features.* parameter among them) at the conv base's.
    head_ids = {id(model.classifier[-2].weight), id(model.classifier[-2].bias)}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in model.param_groups(1e-4, 3e-3)}
    assert by_lr[3e-3] == head_ids
    assert by_lr[1e-4] == {id(p) for p in model.parameters()} - head_ids
    assert {id(p) for p in model.features.parameters()} <= by_lr[1e-4]

    # One training step moves both the conv base and the head.
    model.train()
    x = torch.randn(2, 3, size, size)
    target = torch.softmax(torch.randn(2, 10), dim=1)
    first_conv, new_layer = next(model.features.parameters()), model.classifier[-2].weight
    before = [first_conv.detach().clone(), new_layer.detach().clone()]
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    loss = emd_loss(model(x), target)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before[0], first_conv) and not torch.equal(before[1], new_layer)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert torch.allclose(out.sum(dim=1), torch.ones(2), atol=1e-5)

    # Checkpoint round trip through test.py: model_args alone rebuilds it, and the
    # predictions it writes are this model's.
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": model_args})
    pred = tmp_path / "pred"
    assert run_test(["--model", ckpt, "--test_images", few_images, "--predictions", pred, "--workers", "0", "--quiet",
                     "--amp", "off"]) == 0  # exact float32: bf16 (auto on some CPUs) would move the 6th decimal
    with open(pred / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    transform = eval_transform(model_args)
    batch = torch.stack([transform(load_rgb(few_images / row["image_id"])) for row in rows])
    by_hand = torch.stack([centre_crop_by_hand(few_images / row["image_id"], model_args) for row in rows])
    assert torch.allclose(batch, by_hand, atol=1e-5)  # eval_transform is the preprocessing it says
    with torch.no_grad():
        expected = model(batch)
    written = torch.tensor([[float(row[f"p{k}"]) for k in range(1, 11)] for row in rows])
    assert torch.allclose(written, expected, atol=1e-6)  # the CSV keeps 6 decimals
    assert torch.load(ckpt, weights_only=True)["model_args"] == model_args


@pytest.mark.slow
def test_paper_head_key_layout():
    model = build_model(small_args("vgg16", head="paper"))
    state = model.state_dict()
    head_keys = [k for k in state if not k.startswith("features.")]
    assert head_keys == [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert state["classifier.0.weight"].shape == (4096, 25088)
    assert state["classifier.3.weight"].shape == (4096, 4096)
    assert state["classifier.6.weight"].shape == (10, 4096)
    # fc6/fc7 and the conv layers keep torchvision's own keys, so its ImageNet weights fit.
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    for key, value in vgg.items():
        if not key.startswith("classifier.6."):
            assert state[key].shape == value.shape, key
    # The paper's dropout (--dropout, 0.75) sits before the new 10-way layer; fc7 keeps
    # torchvision's 0.5. fc6/fc7 are pretrained: conv_base_lr, only the new layer dense_lr.
    assert model.classifier[2].p == 0.5 and model.classifier[5].p == 0.75
    base, dense = model.param_groups(1e-4, 1e-3)
    assert [p.shape for p in dense["params"]] == [(10, 4096), (10,)]
    assert sum(p.numel() for p in base["params"]) == sum(v.numel() for k, v in vgg.items() if not k.startswith("classifier.6."))
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.allclose(out.sum(dim=1), torch.ones(2), atol=1e-5)


def test_reference_head_is_default_and_old_checkpoints_load_as_reference(tmp_path):
    assert default_model_args("vgg16")["head"] == "reference"
    keys = list(build_model(small_args("vgg16")).state_dict())
    assert len(keys) == 28 and keys[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    old_args = small_args("tiny_cnn")
    del old_args["head"]  # written before --head existed
    model = build_model(old_args)
    save_checkpoint(tmp_path / "old.pth", {"model": model.state_dict(), "model_args": old_args})
    loaded, _ = load_for_inference(tmp_path / "old.pth")
    assert len(loaded.classifier) == 3 and loaded.classifier[1].in_features == 128


def test_pretrained_path_fills_backbone_and_drops_its_classifier(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(reference.state_dict(), tmp_path / "mnv3.pth")
    model = build_model(small_args("mobilenet_v3_large"), pretrained=str(tmp_path / "mnv3.pth"))
    state, ref = model.state_dict(), reference.state_dict()
    assert torch.equal(state["features.features.0.0.weight"], ref["features.0.0.weight"])
    # Kept: the pretrained Linear(960, 1280) + Hardswish; gone: its dropout and 1000-way layer.
    assert torch.equal(state["features.classifier.0.weight"], ref["classifier.0.weight"])
    assert [type(m) for m in model.features.classifier] == [nn.Linear, nn.Hardswish]
    assert model.classifier[1].in_features == 1280
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(PretrainedWeightsError, match="does not fit torchvision's mobilenet_v3_large"):
        build_model(small_args("mobilenet_v3_large"), pretrained=str(tmp_path / "other.pth"))


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("squeezenet1_1", 512), ("googlenet", 1024), ("alexnet", 9216)])
def test_any_torchvision_model_by_name(name, width):
    assert name not in list_backbones()
    model_args = small_args(name)
    model = build_model(model_args)
    assert model.classifier[1].in_features == width
    # Nothing of the ImageNet classifier is left: no dropout, no auxiliary heads.
    assert not any(isinstance(m, nn.Dropout) for m in model.features.modules())
    model.train()  # googlenet's forward returns a plain tensor once its aux heads are gone
    size = model_args["image_size"]
    out = model(torch.rand(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_main_trains_a_curated_backbone(demo_data, tmp_path):
    # A 4-image training split and 2 validation images: one step of main.py's own loop.
    for split, n in (("train", 4), ("val", 2)):
        lines = (demo_data / f"{split}_labels.csv").read_text().splitlines()[:n]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    ckpt = tmp_path / "ckpt"
    argv = tiny_train_args(demo_data, ckpt, "--base_model", "mobilenet_v3_large", "--image_size", "64",
                           "--resize_size", "72", "--epochs", "1", "--train_csv_file", tmp_path / "train.csv",
                           "--val_csv_file", tmp_path / "val.csv")
    # One step from random weights: the two validation predictions come out equal (an
    # untrained pooled network), and the correlations of a constant are NaN with a warning.
    with pytest.warns(RuntimeWarning, match="correlation of a constant"):
        assert run_main(argv) == 0
    model_args = torch.load(ckpt / "best.pth", weights_only=True)["model_args"]
    assert model_args == dict(default_model_args("mobilenet_v3_large"), image_size=64, resize_size=72)
    model, _ = load_for_inference(ckpt / "best.pth")
    assert model.classifier[1].in_features == 1280


@pytest.mark.parametrize("flags, message", [
    (["--base_model", "resnet5"], "the curated backbones are convnext_tiny, efficientnet_b0, inception_v3"),
    (["--base_model", "resnet50", "--head", "paper"], "--head paper exists for vgg16 only"),
    (["--base_model", "inception_v3", "--image_size", "64", "--resize_size", "72"], "inception_v3 needs at least 75 px"),
    (["--base_model", "vit_b_16", "--image_size", "256", "--resize_size", "288"], "vit_b_16 takes exactly 224 px"),
])
def test_main_refuses_bad_model_flags(demo_data, tmp_path, capsys, flags, message):
    assert run_main(tiny_train_args(demo_data, tmp_path / "ckpt", *flags)) == 2
    assert message in capsys.readouterr().err
