"""tools/export.py: TorchScript always, ONNX when onnx/onnxruntime are installed; the
parity check, the preprocessing JSON, and the refusals."""
import importlib.util
import json

import pytest
import torch

from model import build_model, default_model_args, save_checkpoint
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from tools import export as export_tool


def run_export(argv):
    return export_tool.main(export_tool.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny_cnn checkpoint whose outputs are far from one-hot, so the parity check
    compares real probabilities."""
    torch.manual_seed(0)
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    model = build_model(model_args).eval()
    with torch.no_grad():
        assert model(torch.rand(4, 3, 32, 32)).max() < 0.9
    path = tmp_path_factory.mktemp("export") / "tiny.pth"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args})
    return path, model, model_args


def check_sidecar(path, fmt, model_args):
    meta = json.loads((path.parent / (path.name + ".json")).read_text())
    pre = meta["preprocessing"]
    assert meta["format"] == fmt and meta["model_args"] == model_args
    assert (pre["resize_size"], pre["image_size"], pre["interpolation"]) == (40, 32, "bilinear")
    assert pre["normalize"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert meta["rating_bins"] == list(range(1, 11))
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["output"]["shape"] == ["batch", 10]
    assert 0 <= meta["max_abs_diff_vs_pytorch"] <= 1e-4


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:FutureWarning")  # deprecated upstream; still what libtorch loads
def test_torchscript_export_matches_pytorch_at_any_batch_size(checkpoint, tmp_path, capsys):
    ckpt, model, model_args = checkpoint
    out = tmp_path / "nima.pt"
    assert run_export(["--model", ckpt, "--format", "torchscript", "--out", out]) == 0
    assert "max |torchscript - PyTorch| = " in capsys.readouterr().out
    check_sidecar(out, "torchscript", model_args)
    loaded = torch.jit.load(str(out))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert got.shape == (5, 10) and (got - expected).abs().max() <= 1e-4


@pytest.mark.slow
def test_onnx_export_matches_pytorch_in_onnxruntime(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ckpt, model, model_args = checkpoint
    out = tmp_path / "nima.onnx"
    assert run_export(["--model", ckpt, "--format", "onnx", "--out", out]) == 0
    assert "max |onnx - PyTorch| = " in capsys.readouterr().out
    check_sidecar(out, "onnx", model_args)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 32, 32)
    got = torch.from_numpy(session.run(["distribution"], {"images": x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert got.shape == (7, 10) and (got - expected).abs().max() <= 1e-4


def test_unnormalised_checkpoint_says_so(tmp_path):
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40, normalize="none")
    save_checkpoint(tmp_path / "raw.pth", {"model": build_model(model_args).state_dict(), "model_args": model_args})
    out = tmp_path / "raw.pt"
    assert run_export(["--model", tmp_path / "raw.pth", "--format", "torchscript", "--out", out]) == 0
    assert json.loads((tmp_path / "raw.pt.json").read_text())["preprocessing"]["normalize"] is None


def test_missing_onnxruntime_exits_2_with_the_pip_command(checkpoint, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert run_export(["--model", checkpoint[0], "--format", "onnx", "--out", tmp_path / "m.onnx"]) == 2
    err = capsys.readouterr().err
    assert "missing: onnxruntime" in err and "pip install -r requirements-export.txt" in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_export_that_disagrees_is_not_written(checkpoint, tmp_path, monkeypatch, capsys):
    real = export_tool.export_torchscript

    def off_by_a_bit(model, example, path):  # a broken exporter: its outputs drift by 1e-3
        run = real(model, example, path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export_tool, "export_torchscript", off_by_a_bit)
    out = tmp_path / "bad.pt"
    assert run_export(["--model", checkpoint[0], "--format", "torchscript", "--out", out]) == 1
    assert "differs from PyTorch by 0.001" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unreadable_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert run_export(["--model", tmp_path / "junk.pth", "--format", "torchscript", "--out", tmp_path / "x.pt"]) == 2
    assert "junk.pth" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:FutureWarning")
def test_torchscript_export_of_inception_v3(tmp_path, capsys):
    """The backbone whose torchvision forward changes most (aux heads removed, input
    transform): traced at batch 2, checked by the tool at batch 1 and 3."""
    torch.manual_seed(0)
    model_args = dict(default_model_args("inception_v3"), image_size=75, resize_size=84)
    save_checkpoint(tmp_path / "inc.pth", {"model": build_model(model_args).state_dict(), "model_args": model_args})
    assert run_export(["--model", tmp_path / "inc.pth", "--format", "torchscript", "--out", tmp_path / "inc.pt"]) == 0
    assert "max |torchscript - PyTorch| = " in capsys.readouterr().out
    assert torch.jit.load(str(tmp_path / "inc.pt"))(torch.rand(4, 3, 75, 75)).shape == (4, 10)
