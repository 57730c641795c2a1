"""Which precision and memory layout is fastest on this CPU, per backbone: the figures
behind engine/runtime.py's CPU_BF16_BACKBONES and CPU_CHANNELS_LAST.

    python -m bench.cpu_layouts                                  # every curated backbone
    python -m bench.cpu_layouts --names vgg16 tiny_cnn --rounds 5 --out layouts.jsonl

For each backbone (NIMA head, its default input size, random weights: speed does not
depend on them) one forward pass of --batch_size images under torch.no_grad, in four
settings: float32 and bf16 autocast, each in the default (contiguous) layout and in
channels_last. The settings take turns, round after round, so that load drifting on a
shared machine hits all four alike; a round repeats the pass for at least 0.5 s, and
each setting reports its best round (images/s). Printed
first: the processor, whether torch sees native bf16 in it, the load and the threads.
"""
if not __package__:  # run by path (python bench/cpu_layouts.py): run as python -m bench.cpu_layouts
    import _by_path
    _by_path.run_as_module(__file__)

import os
import sys
import time

import torch

from bench.cpu_scoring import append_jsonl
from bench.timing import cpu_model_name
from engine.flags import ArgumentParser
from model import build_model, default_model_args, list_backbones
from engine.runtime import cpu_has_native_bf16

MIN_ROUND_S = 0.5  # a round repeats the forward pass for at least this long (timer and scheduler noise)
SETTINGS = (("float32", False, False), ("float32_cl", False, True), ("bf16", True, False), ("bf16_cl", True, True))


def get_args_parser():
    p = ArgumentParser(description="CPU images/s of each backbone in float32 / bf16, contiguous / channels_last.",
                                allow_abbrev=False)
    p.add_argument("--names", nargs="+", default=None, help="backbones (default: every curated one)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass (test.py's CPU default)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per setting, taking turns; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--out", default=None, help="also append one JSON line per backbone here")
    return p


def measure(name: str, batch_size: int, rounds: int) -> dict:
    model_args = default_model_args(name)
    torch.manual_seed(0)
    model = build_model(model_args, pretrained="none").eval()
    size = model_args["image_size"]
    x = torch.rand(batch_size, 3, size, size)
    best = {label: float("inf") for label, _, _ in SETTINGS}
    with torch.no_grad():
        for round_ in range(rounds + 1):  # round 0 warms up: oneDNN picks its kernels per setting
            for label, amp, cl in SETTINGS:
                fmt = torch.channels_last if cl else torch.contiguous_format
                net, inputs = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    passes, start = 0, time.perf_counter()
                    while passes == 0 or time.perf_counter() - start < MIN_ROUND_S:  # light networks: many passes
                        net(inputs)
                        passes += 1
                    seconds = (time.perf_counter() - start) / passes
                if round_:
                    best[label] = min(best[label], seconds)
    rates = {label: batch_size / s for label, s in best.items()}
    return {"backbone": name, "image_size": size, "batch_size": batch_size, **{f"{k}_images_per_s": v for k, v in rates.items()},
            "fastest": max(rates, key=rates.get)}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.names or list_backbones()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hardware = {"cpu": cpu_model_name(), "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
                "load_average": load, "torch": torch.__version__}
    print(f"{hardware['cpu'] or 'unknown CPU'}, native bf16: {'yes' if hardware['native_bf16'] else 'no'}, "
          f"{hardware['threads']} threads, load average {load:.2f} at the start, torch {torch.__version__}")
    print(f"{'backbone':<20} {'size':>4}  " + " ".join(f"{label:>10}" for label, _, _ in SETTINGS) + "  fastest")
    rows = []
    for name in names:
        row = dict(measure(name, args.batch_size, args.rounds), **hardware)
        rows.append(row)
        print(f"{name:<20} {row['image_size']:>4}  " + " ".join(f"{row[label + '_images_per_s']:>10.1f}" for label, _, _ in SETTINGS)
              + f"  {row['fastest']}", flush=True)
    if args.out:
        append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
