"""hubconf.py through torch.hub.load(..., source='local'): no network needed."""
import pytest
import torch
import torchvision

from conftest import ROOT
from dataset import load_rgb
from model import build_model, default_model_args, load_for_inference, save_checkpoint


def hub_load(**kwargs):
    return torch.hub.load(ROOT, "nima", source="local", **kwargs)


def test_hub_loads_a_checkpoint_ready_to_score(demo_data, tmp_path):
    torch.manual_seed(0)
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    save_checkpoint(tmp_path / "best.pth", {"model": build_model(model_args).state_dict(), "model_args": model_args})
    model = hub_load(checkpoint=str(tmp_path / "best.pth"))
    assert not model.training and model.model_args == model_args
    reference, _ = load_for_inference(tmp_path / "best.pth")
    image = load_rgb(sorted((demo_data / "images").iterdir())[0])
    x = model.preprocess(image).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        dist = model(x)
        assert torch.equal(dist, reference(x))
    assert dist.shape == (1, 10) and torch.allclose(dist.sum(), torch.tensor(1.0), atol=1e-5)


def test_hub_builds_a_fresh_model_with_local_backbone_weights(tmp_path):
    torch.manual_seed(1)
    weights = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    torch.save(weights, tmp_path / "mnv3.pth")
    model = hub_load(base_model="mobilenet_v3_large", pretrained=str(tmp_path / "mnv3.pth"), image_size=64, resize_size=72)
    assert not model.training
    assert model.model_args == dict(default_model_args("mobilenet_v3_large"), image_size=64, resize_size=72)
    assert torch.equal(model.state_dict()["features.features.0.0.weight"], weights["features.0.0.weight"])
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_hub_refuses_arguments_the_checkpoint_decides(tmp_path):
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    save_checkpoint(tmp_path / "best.pth", {"model": build_model(model_args).state_dict(), "model_args": model_args})
    with pytest.raises(ValueError, match="drop dropout"):
        hub_load(checkpoint=str(tmp_path / "best.pth"), dropout=0.5)
    with pytest.raises(ValueError, match="unknown argument.*colour"):
        hub_load(base_model="tiny_cnn", colour="red")
