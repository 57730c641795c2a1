"""The commands users type first, with every flag at its default except the paths,
`--epochs` and `--pretrained none` (offline): the default backbone (VGG16 at 224 px),
on a few small images. Train, resume, score, export, start a new run from the result,
score under torchrun; and every checkpoint those runs write, whatever ends them (the
last epoch, SIGTERM, SIGKILL, a divergence), loads with a plain
`torch.load(path, weights_only=True)`: no allowlist, no Python object but plain values
and tensors."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from tools import make_demo_data

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

# What a run at the defaults must record: the reference's network (written out by hand).
VGG16_DEFAULTS = {"base_model": "vgg16", "num_classes": 10, "dropout": 0.75, "image_size": 224, "resize_size": 256,
                  "normalize": "imagenet", "head": "reference"}
PLAIN_SCALARS = (type(None), bool, int, float, str)


def run(*argv, timeout=600):
    """`python ARGV...` from the repository root, as the README shows the commands."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_plain(value, where):
    """Only tensors, plain scalars and dicts/lists/tuples of them, by exact type."""
    if type(value) in PLAIN_SCALARS or type(value) is torch.Tensor:
        return
    if type(value) in (dict,) or type(value).__name__ == "OrderedDict":
        for k, v in value.items():
            assert type(k) in (str, int), f"{where}: key {k!r} is a {type(k)}"
            assert_plain(v, f"{where}[{k!r}]")
        return
    assert type(value) in (list, tuple), f"{where} is a {type(value).__module__}.{type(value).__qualname__}"
    for n, v in enumerate(value):
        assert_plain(v, f"{where}[{n}]")


def load_every_checkpoint(folder):
    """Every .pth under `folder`, loaded with a plain torch.load(weights_only=True)."""
    paths = sorted(folder.glob("*.pth"))
    loaded = {}
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no safe_globals: plain values only
        assert_plain(ckpt, path.name)
        loaded[path.name] = ckpt
    return loaded


def train_argv(data, ckpt, *extra):
    return ["main.py", "--train", "--img_path", data / "images", "--train_csv_file", data / "train_labels.csv",
            "--val_csv_file", data / "val_labels.csv", "--ckpt_path", ckpt, "--pretrained", "none", *extra]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Ten 96x72 images (7 to train on, 3 to validate), then the seed README's flow at the
    defaults: one epoch, and a resume to the second."""
    root = tmp_path_factory.mktemp("defaults")
    data = root / "data"
    make_demo_data.main(["--out", str(data), "--num_images", "10", "--val_fraction", "0.3", "--test_fraction", "0"])
    ckpt = root / "ck"
    first = run(*train_argv(data, ckpt, "--epochs", "1"))
    second = run(*train_argv(data, ckpt, "--epochs", "2", "--resume", ckpt / "last.pth"))
    return {"root": root, "data": data, "ckpt": ckpt, "first": first, "second": second}


def test_training_and_resume_at_the_defaults(flow):
    assert flow["first"].returncode == 0, flow["first"].stderr
    assert flow["second"].returncode == 0, flow["second"].stderr
    assert "training vgg16 on 7 images, validating on 3" in flow["first"].stdout
    assert "resumed from epoch 1" in flow["second"].stdout
    with open(flow["ckpt"] / "metrics.jsonl") as f:
        assert [int(line.split('"epoch": ')[1].split(",")[0]) for line in f] == [1, 2]
    loaded = load_every_checkpoint(flow["ckpt"])
    assert {"best.pth", "last.pth", "epoch-1.pth"} <= set(loaded)
    for name, ckpt in loaded.items():
        assert ckpt["model_args"] == VGG16_DEFAULTS, name
        assert type(ckpt["model_args"]["base_model"]) is str
    assert loaded["last.pth"]["epoch"] == 2
    # The flags as typed: None where the model's default applied.
    assert (loaded["last.pth"]["args"]["base_model"], loaded["last.pth"]["args"]["dropout"]) == (None, None)


def read_predictions(path):
    with open(path, newline="") as f:
        return {r["image_id"]: np.array([float(r[f"p{k}"]) for k in range(1, 11)]) for r in csv.DictReader(f)}


def test_scoring_the_result_in_one_and_two_processes(flow):
    ckpt, images = flow["ckpt"] / "best.pth", flow["data"] / "images"
    one = run("test.py", "--model", ckpt, "--test_images", images, "--predictions", flow["root"] / "out1")
    assert one.returncode == 0, one.stderr
    assert "scored 10 of 10 images" in one.stdout
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "test.py", "--model", ckpt,
              "--test_images", images, "--predictions", flow["root"] / "out2", "--device", "cpu")
    assert two.returncode == 0, two.stderr
    a, b = read_predictions(flow["root"] / "out1" / "predictions.csv"), read_predictions(flow["root"] / "out2" / "predictions.csv")
    assert sorted(a) == sorted(b) == sorted(f"demo{n:05d}.jpg" for n in range(10))
    for image_id in a:
        assert abs(a[image_id].sum() - 1) < 1e-5
        np.testing.assert_allclose(a[image_id], b[image_id], atol=1e-5)


def test_export_and_a_new_run_from_the_result(flow):
    exported = run("-m", "tools.export", "--model", flow["ckpt"] / "best.pth", "--format", "torchscript",
                   "--out", flow["root"] / "nima.pt")
    assert exported.returncode == 0, exported.stderr
    assert (flow["root"] / "nima.pt").stat().st_size > 50e6  # VGG16's conv weights, float32
    new = flow["root"] / "ck_init"
    started = run(*train_argv(flow["data"], new, "--epochs", "1", "--init_from", flow["ckpt"] / "best.pth"))
    assert started.returncode == 0, started.stderr
    for name, ckpt in load_every_checkpoint(new).items():
        assert ckpt["model_args"] == VGG16_DEFAULTS, name


def wait_for(path, proc, seconds):
    """Until `path` exists (or the process ended, or the time is up)."""
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_files_of_a_stopped_run_load_plain(flow, sig, tmp_path):
    """A run stopped mid-training (last.pth every step) leaves only plain checkpoints."""
    ckpt = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, *map(str, train_argv(flow["data"], ckpt, "--epochs", "50",
                                                                   "--save_every_steps", "1", "--train_batch_size", "2"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(ckpt / "last.pth", proc, 300), "no last.pth within 300 s"
        time.sleep(1.0)  # into the following steps
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL), err
    loaded = load_every_checkpoint(ckpt)
    assert "last.pth" in loaded
    assert all(c["model_args"] == VGG16_DEFAULTS for c in loaded.values())
    if sig == signal.SIGTERM:  # a killed run may leave a half-written temporary: the next run removes it
        assert not list(ckpt.glob("*.tmp*")), "a temporary file left behind"


def test_a_divergence_leaves_the_checkpoints_plain_and_finite(flow, tmp_path):
    """A warm start at an absurd rate diverges within its epoch (the first step leaves
    huge weights, the next ones NaN): exit 1, nothing written from that state, and every
    file there is still plain and finite."""
    ckpt = tmp_path / "ck"
    shutil.copytree(flow["ckpt"], ckpt, copy_function=os.link)  # checkpoints are replaced by rename, never written in place
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*.pth")}
    diverged = run(*train_argv(flow["data"], ckpt, "--epochs", "2", "--warm_start", "--warm_start_epoch", "1",
                               "--conv_base_lr", "1e30", "--dense_lr", "1e30", "--train_batch_size", "2"))
    assert diverged.returncode == 1, diverged.stderr
    assert "is intact" in diverged.stderr
    loaded = load_every_checkpoint(ckpt)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*.pth")} == before
    for name, c in loaded.items():
        assert all(torch.isfinite(t).all() for t in c["model"].values() if t.is_floating_point()), name
