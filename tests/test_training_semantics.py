"""What a training run learns, checked against expectations built without the code under
test: the augmentation's crops and mirrors made by hand with PIL and numpy, the
early-stopping counter counted by hand from metrics.jsonl, each learning rate read back
from the saved optimiser and from one SGD step's effect on the weights, and unreadable
images kept out of the gradient (one step with them equals one step without them).

Comparing one run of the code with another run of the same code cannot see a mistake
present in both; every test here has an expectation of its own."""
import copy
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import hand_resize, run_main, tiny_train_args
from dataset import train_transform
from engine.runtime import Runtime
from engine.train.epoch import EpochProgress, train_one_epoch
from model import build_model, default_model_args
from model.nima import NIMA


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(ckpt):
    with open(ckpt / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def subset_csvs(demo_data, folder, n_train, n_val):
    """The first n rows of the demo training and validation CSVs: with --train_batch_size 8
    and n_train <= 8, an epoch is exactly one optimiser step."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("val", n_val)):
        lines = (demo_data / f"{split}_labels.csv").read_text().splitlines()[:n]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
        out += ["--" + split + "_csv_file", folder / f"{split}.csv"]
    return out


def as_uint8(x):
    """A (3, H, W) tensor of ToTensor() values back to (H, W, 3) uint8 pixels."""
    return np.rint(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# --- 1. the training augmentation: random crops, half of them mirrored left-right --------

def test_training_crops_are_random_crops_and_their_horizontal_mirrors(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"  # lossless, and no two crops or mirrors of noise coincide
    Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    size = 32
    model_args = dict(default_model_args("tiny_cnn"), image_size=size, resize_size=40, normalize="none")
    with Image.open(path) as img:
        pixels = hand_resize(img, 40)
    assert pixels.shape == (40, 48, 3)
    crops = {(top, left): pixels[top:top + size, left:left + size]
             for top in range(pixels.shape[0] - size + 1) for left in range(pixels.shape[1] - size + 1)}

    transform = train_transform(model_args)
    plain, mirrored = [], []
    for seed in range(64):
        torch.manual_seed(seed)  # the training dataset seeds each sample like this (per seed, epoch, index)
        with Image.open(path) as img:
            x = transform(img.convert("RGB"))
        assert x.shape == (3, size, size)
        got = as_uint8(x)
        as_crop = [pos for pos, c in crops.items() if np.array_equal(got, c)]
        as_mirror = [pos for pos, c in crops.items() if np.array_equal(got, c[:, ::-1])]
        assert len(as_crop) + len(as_mirror) == 1, f"seed {seed}: not one crop of the resized image or its mirror"
        (plain if as_crop else mirrored).extend(as_crop or as_mirror)
    # The flip is a coin toss per sample (p = 0.5): 64 fixed seeds give 34 / 30.
    assert 16 <= len(mirrored) <= 48 and len(plain) + len(mirrored) == 64
    # The crop position is random as well, for flipped and unflipped samples alike.
    assert len(set(plain)) > 5 and len(set(mirrored)) > 5


# --- 2. the early-stopping counter survives a resume --------------------------------------

def counters_by_hand(records, key="val_emd"):
    """Epochs since the last strict improvement of `key` (lower is better), per epoch."""
    best, since, out = float("inf"), 0, []
    for r in records:
        if r[key] < best:
            best, since = r[key], 0
        else:
            since += 1
        out.append(since)
    return out


@pytest.mark.slow
def test_resume_keeps_the_early_stopping_counter(demo_data, tmp_path):
    # squeezenet1_1 has no batch norm, so with both learning rates 0 the weights and the
    # validation EMD never change: epoch 1 improves, every later epoch does not, and
    # patience 3 stops an uninterrupted run after epoch 4.
    flags = (*subset_csvs(demo_data, tmp_path / "csv", 8, 3), "--base_model", "squeezenet1_1", "--image_size", "64",
             "--resize_size", "72", "--conv_base_lr", "0", "--dense_lr", "0", "--early_stopping_patience", "3",
             "--seed", "5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(tiny_train_args(demo_data, straight, *flags, "--epochs", "10")) == 0
    records = read_metrics(straight)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert len({r["val_emd"] for r in records}) == 1  # the premise: no epoch after the first improves
    assert counters_by_hand(records) == [0, 1, 2, 3]
    assert load(straight / "last.pth")["epochs_without_improvement"] == 3

    # Interrupted after epoch 2 (counter 1), resumed to epoch 3: the counter goes on to 2.
    assert run_main(tiny_train_args(demo_data, split, *flags, "--epochs", "2")) == 0
    assert load(split / "last.pth")["epochs_without_improvement"] == 1
    assert run_main(tiny_train_args(demo_data, split, *flags, "--epochs", "3", "--resume", split / "last.pth")) == 0
    ckpt = load(split / "last.pth")
    assert ckpt["epoch"] == 3 and ckpt["epochs_without_improvement"] == counters_by_hand(records)[2] == 2
    # Resumed again with room for 10 epochs: it stops where the uninterrupted run stopped.
    assert run_main(tiny_train_args(demo_data, split, *flags, "--epochs", "10", "--resume", split / "last.pth")) == 0
    assert [r["epoch"] for r in read_metrics(split)] == [1, 2, 3, 4]
    a, b = load(straight / "last.pth"), load(split / "last.pth")
    assert (b["epoch"], b["epochs_without_improvement"]) == (a["epoch"], a["epochs_without_improvement"]) == (4, 3)
    assert b["best_value"] == a["best_value"] == records[0]["val_emd"]


# --- 3. --conv_base_lr reaches the conv base, --dense_lr the head ----------------------------

def test_each_learning_rate_reaches_its_own_parameters(demo_data, tmp_path):
    """Distinct rates, one SGD step (8 images at batch 8). SGD's first step with momentum
    moves every parameter by -lr * grad and keeps grad as its momentum buffer, so the step
    itself says which rate each parameter got: features.* must get --conv_base_lr and
    exactly the head's final Linear (classifier.1) --dense_lr."""
    conv_lr, dense_lr = 0.02, 0.5
    data = subset_csvs(demo_data, tmp_path / "csv", 8, 3)
    start, stepped = tmp_path / "start", tmp_path / "stepped"
    # Same seed, so the same initial weights; rates 0 leave the parameters as they started.
    assert run_main(tiny_train_args(demo_data, start, *data, "--epochs", "1", "--seed", "4",
                                    "--conv_base_lr", "0", "--dense_lr", "0")) == 0
    assert run_main(tiny_train_args(demo_data, stepped, *data, "--epochs", "1", "--seed", "4",
                                    "--conv_base_lr", str(conv_lr), "--dense_lr", str(dense_lr))) == 0
    record = read_metrics(stepped)[0]
    assert record["lr_conv_base"] == conv_lr and record["lr_dense"] == dense_lr

    model_args = load(stepped / "last.pth")["model_args"]
    names = [n for n, _ in build_model(model_args).named_parameters()]  # parameters, not batch-norm buffers
    head = {"classifier.1.weight", "classifier.1.bias"}
    features = {n for n in names if n.startswith("features.")}
    assert head <= set(names) and len(features) == 12 and set(names) == head | features  # tiny_cnn

    p0, p1 = load(start / "last.pth")["model"], load(stepped / "last.pth")["model"]
    optimizer = load(stepped / "last.pth")["optimizer"]
    groups = optimizer["param_groups"]
    assert sorted(g["lr"] for g in groups) == sorted([conv_lr, dense_lr])
    buffers = {i: s["momentum_buffer"] for i, s in optimizer["state"].items()}
    lr_of = {i: g["lr"] for g in groups for i in g["params"]}
    assert sorted(lr_of) == sorted(buffers) and len(lr_of) == len(names)  # each parameter in one group

    # Which optimiser slot each parameter is: the one whose step (-lr * its buffer) is
    # exactly this parameter's change.
    slot = {}
    for name in names:
        delta = p1[name] - p0[name]
        assert delta.abs().max() > 1e-6, f"{name} did not move"
        fits = [i for i, buf in buffers.items()
                if buf.shape == delta.shape and torch.allclose(delta, -lr_of[i] * buf, rtol=1e-4, atol=1e-7)]
        assert len(fits) == 1, f"{name}: moved by no group's rate times one gradient ({len(fits)} fits)"
        slot[name] = fits[0]
    assert len(set(slot.values())) == len(names)
    by_lr = {lr: {n for n in names if lr_of[slot[n]] == lr} for lr in (conv_lr, dense_lr)}
    assert by_lr[dense_lr] == head, "the --dense_lr group is not exactly the head's final Linear"
    assert by_lr[conv_lr] == features, "the --conv_base_lr group is not exactly the conv base"
    named = {g["name"]: {n for n in names if slot[n] in g["params"]} for g in groups}
    assert named == {"dense": head, "conv_base": features}  # the names metrics.jsonl reports them by


# --- 4. unreadable images weigh nothing in the gradient -------------------------------------

def small_nima(seed):
    """NIMA over a two-layer conv base without batch norm (whose batch statistics would
    otherwise mix the stand-in images into the readable rows) and without dropout."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU())
    return NIMA(features, nn.AdaptiveAvgPool2d(1), 8, dropout=0.0)


def emd_by_hand(p, q):
    """EMD with r = 2 per sample, from the cumulative distributions."""
    return np.sqrt(((np.cumsum(p, 1) - np.cumsum(q, 1)) ** 2).mean(1))


def one_step(model, batch, paths):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rt = Runtime(torch.device("cpu"), show_progress=False)
    torch.manual_seed(0)
    progress = train_one_epoch(model, [batch], optimizer, rt, 1, EpochProgress(), paths=paths, log=lambda *a: None)
    return progress, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_unreadable_rows_do_not_move_the_weights():
    rng = np.random.default_rng(1)
    ok = torch.tensor([True, False, True, True, False, True])
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    images[~ok] = 0  # the dataset's blank stand-ins
    targets = torch.tensor(rng.dirichlet(np.ones(10), 6), dtype=torch.float32)
    targets[~ok] = torch.eye(10)[9]  # the unreadable rows' labels: far from any prediction
    paths = [f"img{i}.jpg" for i in range(6)]
    batch = {"index": torch.arange(6), "image": images, "target": targets, "ok": ok,
             "error": ["" if good else "truncated image" for good in ok.tolist()]}
    keep = ok.nonzero().flatten()
    clean = {"index": keep, "image": images[keep], "target": targets[keep], "ok": ok[keep], "error": [""] * len(keep)}

    model = small_nima(3)
    start = copy.deepcopy(model).eval()
    progress, with_bad = one_step(model, batch, paths)
    _, without = one_step(small_nima(3), clean, paths)
    for name in without:
        assert torch.allclose(with_bad[name], without[name], rtol=1e-5, atol=1e-7), name

    # The reported loss is the mean EMD over the readable rows, before the step.
    with torch.no_grad():
        pred = start(images[keep]).numpy()
    assert progress.loss_count == 4 and progress.samples == 6 and progress.skipped == ["img1.jpg", "img4.jpg"]
    assert progress.loss_sum / progress.loss_count == pytest.approx(
        emd_by_hand(pred, targets[keep].numpy()).mean(), abs=1e-6)

    # The comparison can see a difference: the same batch read as all readable steps elsewhere.
    _, all_counted = one_step(small_nima(3), dict(batch, ok=torch.ones(6, dtype=torch.bool), error=[""] * 6), paths)
    assert max((all_counted[n] - without[n]).abs().max().item() for n in without) > 1e-3


def test_unreadable_training_file_trains_like_the_set_without_it(demo_data, tmp_path):
    """End to end: a training CSV with a truncated image gives, after one step, the weights
    of the same CSV without that row. squeezenet1_1 (no batch norm), --dropout 0: the
    readable samples get the same crops (a function of seed, epoch and their index, and
    the broken row comes last) and nothing else depends on the batch's make-up."""
    with open(demo_data / "train_labels.csv") as f:
        rows = list(csv.reader(f))[:8]
    images = tmp_path / "images"
    images.mkdir()
    for row in rows:
        shutil.copy(demo_data / "images" / f"{row[0]}.jpg", images)
    payload = (images / f"{rows[0][0]}.jpg").read_bytes()
    (images / "broken.jpg").write_bytes(payload[:len(payload) // 2])
    with open(tmp_path / "with_broken.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows + [["broken"] + rows[0][1:]])
    with open(tmp_path / "readable.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    flags = ("--img_path", images, "--val_csv_file", tmp_path / "readable.csv", "--base_model", "squeezenet1_1",
             "--image_size", "64", "--resize_size", "72", "--dropout", "0", "--train_batch_size", "16",
             "--epochs", "1", "--conv_base_lr", "0.05", "--dense_lr", "0.5", "--seed", "2")
    runs = {"with_broken": (), "readable": (), "start": ("--conv_base_lr", "0", "--dense_lr", "0")}
    for name, extra in runs.items():
        csv_file = tmp_path / f"{'readable' if name == 'start' else name}.csv"
        assert run_main(tiny_train_args(demo_data, tmp_path / name, *flags, "--train_csv_file", csv_file, *extra)) == 0
    assert [r["skipped_images"] for r in read_metrics(tmp_path / "with_broken")] == [1]
    a, b, p0 = (load(tmp_path / name / "last.pth")["model"] for name in runs)
    moved = 0.0
    for name in b:
        if not name.endswith(("weight", "bias")):
            continue
        # The step itself, to 0.1 % of its size (float rounding of the other batch order is
        # about 1e-5 of it); counting the broken row would change it by 11 % or more.
        step_a, step_b = a[name] - p0[name], b[name] - p0[name]
        assert (step_a - step_b).norm() <= 1e-3 * step_b.norm(), name
        moved = max(moved, (b[name] - p0[name]).abs().max().item())
    assert moved > 1e-3
    ra, rb = read_metrics(tmp_path / "with_broken")[0], read_metrics(tmp_path / "readable")[0]
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
