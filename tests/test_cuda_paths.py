"""The speed paths: bf16 autocast and channels_last on CUDA (skipped without a GPU),
and the same code on CPU, where bf16 is opt-in and float32 stays the default."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_main, run_test, tiny_train_args
from engine.runtime import Runtime, configure_backends, resolve_speed_flags
from engine.train.epoch import EpochProgress, train_one_epoch
from model import build_model, default_model_args, emd_per_sample

SIZE = 32


def tiny_model(device, channels_last=False):
    torch.manual_seed(0)
    model = build_model(dict(default_model_args("tiny_cnn"), image_size=SIZE, resize_size=SIZE), pretrained="none")
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batches(n_batches=2, batch_size=4):
    """What the training DataLoader yields (CPU tensors), with one unreadable sample."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ok = torch.ones(batch_size, dtype=torch.bool)
        ok[-1] = False
        out.append({"index": torch.arange(batch_size), "image": torch.randn(batch_size, 3, SIZE, SIZE, generator=g),
                    "target": torch.softmax(torch.randn(batch_size, 10, generator=g), 1), "ok": ok,
                    "error": [""] * (batch_size - 1) + ["truncated image"]})
    return out


def check_train_step(rt, model):
    """One short epoch through our training loop, then the dtypes and values that must hold."""
    optimizer = torch.optim.SGD(model.param_groups(0.01, 0.01), momentum=0.9, foreach=True if rt.device.type == "cuda" else None)
    progress = train_one_epoch(model, batches(), optimizer, rt, 1, EpochProgress(), log=lambda *a, **k: None)
    assert progress.steps == 2 and progress.loss_count == 6 and math.isfinite(progress.loss_sum) and progress.loss_sum > 0
    x = rt.images_to_device(batches(1)[0]["image"])
    with rt.autocast():
        features = model.features(x)
        pred = model(x)
    assert features.dtype == (torch.bfloat16 if rt.amp else torch.float32)
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()  # softmax in float32
    assert torch.allclose(pred.sum(1), torch.ones(len(pred), device=pred.device), atol=1e-5)
    loss = emd_per_sample(pred, torch.softmax(torch.randn(len(pred), 10, device=pred.device), 1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    for p in model.parameters():
        assert p.dtype == torch.float32  # autocast casts copies; the weights stay float32
        assert p.grad is None or torch.isfinite(p.grad).all()
    if rt.channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


# ----- CPU: always run -----

def test_resolve_speed_flags_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_speed_flags("auto", "auto", cpu) == (False, False)  # float32 stays the CPU default
    assert resolve_speed_flags("on", "on", cpu) == (True, True)
    assert resolve_speed_flags("off", "on", cpu) == (False, True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_bf16_autocast_keeps_loss_float32(channels_last):
    rt = Runtime(torch.device("cpu"), amp=True, channels_last=channels_last, show_progress=False)
    check_train_step(rt, tiny_model("cpu", channels_last))


def test_main_and_test_py_with_speed_flags_on_cpu(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--device", "cpu", "--amp", "off", "--channels_last", "on",
                                    "--epochs", "1")) == 0
    state = torch.load(ckpt / "best.pth", weights_only=True)["model"]
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    preds = {}
    for amp in ("off", "on"):  # test.py with bf16 autocast on CPU (opt-in) and without
        out = tmp_path / f"pred_{amp}"
        assert run_test(["--model", ckpt / "best.pth", "--test_csv", demo_data / "test_labels.csv", "--test_images",
                         demo_data / "images", "--predictions", out, "--workers", "0", "--device", "cpu",
                         "--amp", amp, "--channels_last", "on", "--quiet"]) == 0
        preds[amp] = np.loadtxt(out / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 13))
    assert np.isfinite(preds["on"]).all()
    # bf16 keeps 8 bits of mantissa: the mean scores move by well under 0.05 on 1..10.
    assert np.abs(preds["on"][:, 0] - preds["off"][:, 0]).max() < 0.05


def test_configure_backends_leaves_cpu_runs_alone():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    configure_backends(Runtime(torch.device("cpu"), amp=False, show_progress=False))
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before


# ----- CUDA: skipped without a GPU -----

@pytest.mark.gpu
def test_configure_backends_on_cuda():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    try:
        configure_backends(Runtime(torch.device("cuda"), amp=True, show_progress=False))
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        configure_backends(Runtime(torch.device("cuda"), amp=False, show_progress=False))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
def test_cuda_float32_predictions_equal_cpu_to_1e5():
    """With autocast off, IEEE float32 convolutions on CUDA give the CPU's outputs."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    try:
        configure_backends(Runtime(torch.device("cuda"), amp=False, show_progress=False))
        x = torch.rand(8, 3, SIZE, SIZE)
        with torch.no_grad():
            cpu = tiny_model("cpu").eval()(x)
            cuda = tiny_model("cuda").eval()(x.cuda()).cpu()
        print(f"float32 CUDA vs CPU: max abs difference {(cuda - cpu).abs().max().item():.3g}")
        assert torch.allclose(cuda, cpu, atol=1e-5, rtol=0)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
def test_resolve_speed_flags_on_cuda():
    cuda = torch.device("cuda")
    assert resolve_speed_flags("auto", "auto", cuda) == (torch.cuda.is_bf16_supported(), True)
    assert resolve_speed_flags("off", "off", cuda) == (False, False)


@pytest.mark.gpu
def test_cuda_bf16_channels_last_train_step():
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16 support")
    rt = Runtime(torch.device("cuda"), amp=True, channels_last=True, show_progress=False)
    check_train_step(rt, tiny_model("cuda", channels_last=True))


@pytest.mark.gpu
def test_main_and_test_py_on_cuda_defaults(demo_data, tmp_path):
    """main.py and test.py with their CUDA defaults (bf16 + channels_last where supported,
    cudnn.benchmark, pinned memory, foreach SGD) against test.py in float32 on CPU."""
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--device", "cuda", "--epochs", "1", "--num_workers", "1")) == 0
    preds = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"pred_{device}"
        assert run_test(["--model", ckpt / "best.pth", "--test_csv", demo_data / "test_labels.csv", "--test_images",
                         demo_data / "images", "--predictions", out, "--workers", "1", "--device", device, "--quiet"]) == 0
        preds[device] = np.loadtxt(out / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 13))
    assert np.isfinite(preds["cuda"]).all()
    assert np.abs(preds["cuda"][:, 0] - preds["cpu"][:, 0]).max() < 0.05


@pytest.mark.subprocess
@pytest.mark.gpu
def test_bench_quick_on_cuda(tmp_path):
    """The benchmark's CUDA variants (bf16, bf16 + channels_last) run; no time asserted."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.bench", "--quick", "--device", "cuda", "--no_compile"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    variants = {r["variant"] for r in records if r["figure"] == "train_synthetic"}
    if torch.cuda.is_bf16_supported():
        assert {"ours bf16", "ours bf16+channels_last"} <= variants
        jpeg_variants = {r["variant"] for r in records if r["figure"].endswith("_jpeg")}
        # uint8 crops are the CUDA default; the float path and the device decode are measured beside it.
        assert {"ours bf16+channels_last, uint8 loader", "ours bf16+channels_last",
                "ours bf16+channels_last, device decode"} <= jpeg_variants
    assert all(r["images_per_s"] > 0 and r["device"].startswith("cuda") for r in records)
