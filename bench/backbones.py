"""The backbone table: size, cost and CPU speed of every curated base network, beside
the paper's AVA figures where the paper trained that network.

    python -m bench.backbones                      # every curated backbone, then a markdown table
    python -m bench.backbones --names resnet50 mobilenet_v2 --iters 10 --out backbones.jsonl

For each backbone (with the NIMA head, at its default input size, random weights):
  params      all parameters of the NIMA model, head included
  GFLOPs      one forward pass of one image, counted by torch.utils.flop_counter's
              FlopCounterMode: FLOPs = 2 x multiply-adds of convolutions and matrix
              products (normalisation, activations and pooling are not counted)
  images/s    CPU inference throughput: float32, torch.inference_mode, batch
              --batch_size, the median of --iters timed batches after --warmup ones
The median makes the speed robust to other work on a shared machine; the hardware line
printed first says what it was measured on.
"""
if not __package__:  # run by path (python bench/backbones.py): run as python -m bench.backbones
    import _by_path
    _by_path.run_as_module(__file__)

import json
import os
import platform
import statistics
import sys


import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import cpu_model_name, timed
from engine.flags import ArgumentParser
from fileio import atomic_write_text
from model import build_model, default_model_args, list_backbones

# The paper's AVA results (Talebi & Milanfar 2018, table of AVA results): accuracy, LCC
# and SRCC of the mean score. Its networks are not all in torchvision, so each row says
# which network the figures are for.
PAPER_AVA = {
    ("vgg16", "paper"): "VGG16: 80.6 % / 0.610 / 0.592",
    ("inception_v3", "reference"): "Inception-v2: 81.5 % / 0.636 / 0.612",
    ("mobilenet_v2", "reference"): "MobileNet (v1): 80.36 % / 0.518 / 0.510",
    ("mobilenet_v3_large", "reference"): "MobileNet (v1): 80.36 % / 0.518 / 0.510",
}


def get_args_parser():
    p = ArgumentParser(description="Parameters, GFLOPs and CPU images/s of the curated backbones.")
    p.add_argument("--names", nargs="+", default=None,
                   help="backbones to measure (default: every curated one, and vgg16 with --head paper)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (oneDNN picks its kernels)")
    p.add_argument("--iters", type=int, default=5, help="timed batches; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also write one JSON line per backbone here")
    return p


def hardware() -> str:
    cpu = cpu_model_name() or platform.processor() or "unknown CPU"
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} logical cores{load}, torch {torch.__version__} with {torch.get_num_threads()} threads"


def measure(name: str, head: str, batch_size: int, warmup: int, iters: int) -> dict:
    model_args = dict(default_model_args(name), head=head)
    torch.manual_seed(0)
    model = build_model(model_args, pretrained="none").eval()
    size = model_args["image_size"]
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.rand(1, 3, size, size))
        x = torch.rand(batch_size, 3, size, size)
        for _ in range(warmup):
            model(x)
        seconds = [timed(lambda: model(x), "cpu")[1] for _ in range(iters)]
    return {"backbone": name, "head": head, "image_size": size, "resize_size": model_args["resize_size"],
            "params": sum(p.numel() for p in model.parameters()), "gflops": counter.get_total_flops() / 1e9,
            "images_per_s": batch_size / statistics.median(seconds), "batch_size": batch_size, "iters": iters,
            "paper_ava": PAPER_AVA.get((name, head), "")}


def markdown(rows: list) -> str:
    lines = ["| backbone | input (resize/crop) | params | GFLOPs | CPU images/s | paper AVA: acc / LCC / SRCC |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        label = r["backbone"] + (" (`--head paper`)" if r["head"] == "paper" else "")
        lines.append(f"| {label} | {r['resize_size']}/{r['image_size']} | {r['params'] / 1e6:.1f} M | {r['gflops']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['paper_ava'] or '-'} |")
    return "\n".join(lines)


def main(args) -> int:
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        print("error: --batch_size and --iters must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.names:
        runs = [(n, "reference") for n in args.names]
    else:
        others = [n for n in list_backbones() if n not in ("vgg16", "tiny_cnn")]
        runs = [("vgg16", "reference"), ("vgg16", "paper")] + [(n, "reference") for n in others] + [("tiny_cnn", "reference")]
    try:
        for name, _ in runs:
            default_model_args(name)  # an unknown name fails here, before minutes of measuring
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"hardware: {hardware()}", flush=True)
    rows = []
    for name, head in runs:
        rows.append(measure(name, head, args.batch_size, args.warmup, args.iters))
        print(json.dumps(rows[-1]), flush=True)
    print(f"after: {hardware()}")
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
