"""What the CPU's fast paths cost in scores: bf16 autocast against float32, and JPEG draft
decoding against the exact decode, each measured through test.py on real photographs
with trained checkpoints. The figures of docs/performance.md, "What bf16 and draft
decoding cost"; tests/test_cpu_precision.py holds them to their bounds.

    python -m bench.score_cost [--data DIR] [--out results.jsonl]

Checkpoints (none with pretrained weights: this machine cannot download them):
  demo          tiny_cnn trained as `make demo` trains it (its flags and 30 epochs, on
                --demo_images generated images instead of 600)
  vgg16_steps   VGG16 at 224 trained 2 SGD steps with main.py, from the released-format file
  vgg16_release VGG16 in the reference's release format (a bare state_dict): torch's
                initialisation (seed 0) with the head's weights scaled by 30, which spreads
                the predicted means over photos about as a trained NIMA does (std 0.3-0.4)
Image sets:
  photos        the 9 real photographs of tests/data/photos and 4 crops of each (45 PNGs)
  camera        27 camera-sized JPEGs (2000 x 1500) upscaled from them (bench/ava_like.py)
  labelled      the demo data's images and labels (make_demo_data, seed 1)
  labelled_big  the same images upscaled 16x (1536 x 1152 JPEGs: large enough to be drafted
                for VGG16's 256), for the draft's metrics
For each checkpoint, bf16 (--amp on --exact_decode) against float32 (--amp off
--exact_decode) on photos and labelled, and draft (default decoding) against exact
(--exact_decode), both at --amp off, on camera and labelled_big: the largest and mean
|difference| of the predicted means, the Spearman correlation of the two runs' means,
and on the labelled sets the change of every paper metric (metrics.json).
"""
if not __package__:  # run by path (python bench/score_cost.py): run as python -m bench.score_cost
    import _by_path
    _by_path.run_as_module(__file__)

import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from bench.ava_like import PHOTOS, camera_frame
from bench.cpu_scoring import append_jsonl
from engine.flags import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_METRICS = ("accuracy", "plcc_mean", "srcc_mean", "plcc_std", "srcc_std", "emd")
HEAD_SCALE = 30.0
CROPS = [(0.6, 0.3, 0.3), (0.6, 0.7, 0.7), (0.5, 0.5, 0.5), (0.7, 0.35, 0.65)]  # (size, centre x, centre y) fractions


def run(argv, what) -> str:
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def photo_set(folder) -> str:
    """The real photographs and 4 crops of each, as PNGs (lossless: only the change under
    test differs between two runs)."""
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(PHOTOS)):
        if name.endswith(".md"):
            continue
        with Image.open(os.path.join(PHOTOS, name)) as img:
            rgb = img.convert("RGB")
        stem = os.path.splitext(name)[0]
        rgb.save(os.path.join(folder, f"{stem}.png"))
        w, h = rgb.size
        for n, (f, cx, cy) in enumerate(CROPS):
            cw, ch = int(w * f), int(h * f)
            left, top = min(max(0, int(cx * w - cw / 2)), w - cw), min(max(0, int(cy * h - ch / 2)), h - ch)
            rgb.crop((left, top, left + cw, top + ch)).save(os.path.join(folder, f"{stem}_crop{n}.png"))
    return folder


def camera_set(folder, count=27, size=(2000, 1500)) -> str:
    os.makedirs(folder, exist_ok=True)
    photos = sorted(os.path.join(PHOTOS, n) for n in os.listdir(PHOTOS) if not n.endswith(".md"))
    for n in range(count):
        path = os.path.join(folder, f"cam{n:03d}.jpg")
        if not os.path.exists(path):
            camera_frame(photos[n % len(photos)], n // len(photos), size).save(path, "JPEG", quality=92)
    return folder


def labelled_sets(folder, num_images) -> tuple:
    """(images, labels.csv) of the demo data, and (images, labels.csv) of the same upscaled 16x."""
    demo = os.path.join(folder, "demo")
    if not os.path.exists(os.path.join(demo, "test_labels.csv")):
        run(["-m", "tools.make_demo_data", "--out", demo, "--num_images", num_images, "--seed", "1"], "make_demo_data")
    rows = []
    for split in ("train", "val", "test"):
        with open(os.path.join(demo, f"{split}_labels.csv"), newline="") as f:
            rows += list(csv.reader(f))
    labels = os.path.join(folder, "all_labels.csv")
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows(sorted(rows))
    big = os.path.join(folder, "demo_x16")
    os.makedirs(big, exist_ok=True)
    for name in os.listdir(os.path.join(demo, "images")):
        target = os.path.join(big, name)
        if not os.path.exists(target):
            with Image.open(os.path.join(demo, "images", name)) as img:
                img.convert("RGB").resize((img.width * 16, img.height * 16), Image.Resampling.BICUBIC).save(target, quality=92)
    return (os.path.join(demo, "images"), labels), (big, labels)


def checkpoints(folder, demo_images_dir, demo_epochs) -> dict:
    import torch

    from model import build_model, default_model_args
    os.makedirs(folder, exist_ok=True)
    release = os.path.join(folder, "vgg16_release.pth")
    if not os.path.exists(release):
        torch.manual_seed(0)
        state = build_model(default_model_args("vgg16")).state_dict()
        state["classifier.1.weight"] = state["classifier.1.weight"] * HEAD_SCALE
        torch.save(state, release)
    demo_data = os.path.dirname(demo_images_dir)
    data = ["--img_path", demo_images_dir, "--train_csv_file", os.path.join(demo_data, "train_labels.csv"),
            "--val_csv_file", os.path.join(demo_data, "val_labels.csv"), "--num_workers", "0", "--seed", "0", "--quiet"]
    demo = os.path.join(folder, "demo")
    if not os.path.exists(os.path.join(demo, "best.pth")):  # the Makefile's demo flags
        run(["main.py", "--train", *data, "--ckpt_path", demo, "--base_model", "tiny_cnn", "--pretrained", "none",
             "--conv_base_lr", "0.01", "--dense_lr", "0.01", "--decay", "--lr_decay_freq", "10", "--epochs", demo_epochs,
             "--train_batch_size", "32"], "training the demo model")
    steps = os.path.join(folder, "vgg16_steps")
    if not os.path.exists(os.path.join(steps, "best.pth")):
        small = os.path.join(folder, "steps_csv")
        os.makedirs(small, exist_ok=True)
        for split, count in (("train", 8), ("val", 4)):
            with open(os.path.join(demo_data, f"{split}_labels.csv"), newline="") as f:
                rows = list(csv.reader(f))[:count]
            with open(os.path.join(small, f"{split}.csv"), "w", newline="") as f:
                csv.writer(f).writerows(rows)
        run(["main.py", "--train", *data, "--train_csv_file", os.path.join(small, "train.csv"),
             "--val_csv_file", os.path.join(small, "val.csv"), "--ckpt_path", steps, "--init_from", release,
             "--conv_base_lr", "1e-4", "--dense_lr", "1e-2", "--epochs", "1", "--train_batch_size", "4",
             "--val_batch_size", "4"], "training VGG16 two steps")
    return {"demo": os.path.join(demo, "best.pth"), "vgg16_steps": os.path.join(steps, "best.pth"), "vgg16_release": release}


def score(ckpt, images, out, flags, labels=None) -> tuple:
    """({image id: (mean, std)}, metrics or None) of one test.py run."""
    argv = ["test.py", "--model", ckpt, "--test_images", images, "--predictions", out, "--device", "cpu", "--quiet", *flags]
    if labels:
        argv += ["--test_csv_file", labels]
    run(argv, f"test.py {' '.join(map(str, flags))} on {images}")
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        scores = {r["image_id"]: (float(r["mean"]), float(r["std"])) for r in csv.DictReader(f)}
    metrics = None
    if labels:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    return scores, metrics


def compare(a: tuple, b: tuple) -> dict:
    """How run b's scores differ from run a's (the reference)."""
    from scipy import stats
    (sa, ma), (sb, mb) = a, b
    ids = sorted(sa)
    if sorted(sb) != ids:
        raise RuntimeError("the two runs scored different images")
    mean_a, mean_b = np.array([sa[i][0] for i in ids]), np.array([sb[i][0] for i in ids])
    std_a, std_b = np.array([sa[i][1] for i in ids]), np.array([sb[i][1] for i in ids])
    row = {"images": len(ids), "spread_of_means": float(mean_a.std()),
           "max_abs_mean_diff": float(np.abs(mean_a - mean_b).max()),
           "mean_abs_mean_diff": float(np.abs(mean_a - mean_b).mean()),
           "max_abs_std_diff": float(np.abs(std_a - std_b).max()),
           "spearman_means": float(stats.spearmanr(mean_a, mean_b)[0])}
    if ma is not None:
        row["metric_changes"] = {k: abs(mb[k] - ma[k]) for k in PAPER_METRICS}
        row["max_metric_change"] = max(row["metric_changes"].values())
    return row


def measure(data, demo_images=120, demo_epochs=30, which=("bf16", "draft"), models=None, only=None) -> list:
    """Every comparison as a row: checkpoint, change (bf16 or draft), image set, figures.
    `only`: the (checkpoint, change, image set) comparisons to make, when not every one of
    `which` x `models`."""
    photos = photo_set(os.path.join(data, "photos"))
    camera = camera_set(os.path.join(data, "camera"))
    (small, labels), (big, _) = labelled_sets(os.path.join(data, "labelled"), demo_images)
    ckpts = checkpoints(os.path.join(data, "ckpts"), small, demo_epochs)
    out = os.path.join(data, "out")
    rows = []
    for name, ckpt in ckpts.items():
        if models and name not in models:
            continue
        plans = []
        if "bf16" in which:
            plans += [("bf16", "photos", photos, None, ["--amp", "off", "--exact_decode"], ["--amp", "on", "--exact_decode"]),
                      ("bf16", "labelled", small, labels, ["--amp", "off", "--exact_decode"], ["--amp", "on", "--exact_decode"])]
        if "draft" in which:
            plans += [("draft", "camera", camera, None, ["--amp", "off", "--exact_decode"], ["--amp", "off"]),
                      ("draft", "labelled_big", big, labels, ["--amp", "off", "--exact_decode"], ["--amp", "off"])]
        for change, set_name, images, set_labels, ref_flags, new_flags in plans:
            if only is not None and (name, change, set_name) not in only:
                continue
            ref = score(ckpt, images, os.path.join(out, f"{name}_{set_name}_ref"), ref_flags, set_labels)
            new = score(ckpt, images, os.path.join(out, f"{name}_{set_name}_{change}"), new_flags, set_labels)
            rows.append({"checkpoint": name, "change": change, "set": set_name, **compare(ref, new)})
    return rows


def get_args_parser():
    p = ArgumentParser(description="What bf16 and JPEG draft decoding change in test.py's scores.",
                                allow_abbrev=False)
    p.add_argument("--data", default=None, help="folder for the images, checkpoints and runs (default: a temporary one)")
    p.add_argument("--demo_images", type=int, default=120, help="images of the generated labelled set")
    p.add_argument("--demo_epochs", type=int, default=30, help="epochs of the demo model's training (the Makefile's)")
    p.add_argument("--changes", nargs="+", choices=["bf16", "draft"], default=["bf16", "draft"], help="what to measure")
    p.add_argument("--checkpoints", nargs="+", choices=["demo", "vgg16_steps", "vgg16_release"], default=None,
                   help="which checkpoints (default: all three)")
    p.add_argument("--out", default=None, help="also append one JSON line per comparison here")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.data or tmp, args.demo_images, args.demo_epochs, args.changes, args.checkpoints)
    print(f"{'checkpoint':<14} {'change':<6} {'set':<13} {'images':>6} {'spread':>7} {'max |dmean|':>11} "
          f"{'mean |dmean|':>12} {'Spearman':>9} {'max metric change':>18}")
    for r in rows:
        metric = f"{r['max_metric_change']:.4f}" if "max_metric_change" in r else "-"
        print(f"{r['checkpoint']:<14} {r['change']:<6} {r['set']:<13} {r['images']:>6} {r['spread_of_means']:>7.3f} "
              f"{r['max_abs_mean_diff']:>11.4f} {r['mean_abs_mean_diff']:>12.4f} {r['spearman_means']:>9.5f} {metric:>18}")
    if args.out:
        append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
