"""Benchmark: how fast NIMA trains and predicts, ours against a reference-style loop
measured in the same run, on the same device.

    python -m bench.bench --device cuda --out bench.jsonl          # VGG16 at 224, batch 128
    python -m bench.bench --quick --device cpu                     # smoke run, well under a minute

Prints one JSON line per figure as it is measured, then a table (images/s):
  decode_1core     load_rgb + eval_transform, one process, one thread: originals vs cache
  loader           the training DataLoader alone with --workers workers (and per worker)
  train_synthetic  training steps on random tensors already on the device, with the
                   FLOPs of a training image (torch's FlopCounterMode) and the TFLOP/s
                   reached
  infer_synthetic  prediction on tensors (reference: batch 1, mean/std summed in Python)
  train_jpeg       training end to end from JPEG files through the DataLoader, with the
                   time the step waited for its batch (loader_wait_ms_per_step); float
                   and uint8 loader paths (uint8 is the default on CUDA)
  infer_jpeg       test.py's scoring loop end to end from JPEG files (collection_loader
                   and scored_rows, without the part files), and the same with the
                   uint8 loader and with the JPEGs decoded on the device
On CUDA "fp32" is IEEE float32 throughout (TF32 convolutions off, as main.py and
test.py run with --amp off); the reference keeps torch's defaults (TF32 convolutions,
no cuDNN autotuning). "Ours" runs the project's own code (build_model, Runtime, train_one_epoch, predict,
collection_loader, scored_rows, make_loader, ImageDataset and its transforms) with each speed flag that
applies to the device; "reference" runs bench/reference_loop.py. The JPEGs are
generated AVA-like files (bench/ava_like.py) and their cache is made by
tools/resize_images.py. Every line names the hardware it was measured on.
"""
if not __package__:  # run by path (python bench/bench.py): run as python -m bench.bench
    import _by_path
    _by_path.run_as_module(__file__)

import contextlib
import json
import os
import sys
import tempfile
import time


import torch

from bench import figures
from bench.ava_like import folder_stats, make_ava_like_jpegs
from bench.timing import cpu_model_name
from engine.distributed import pick_device
from engine.flags import ArgumentParser
from fileio import atomic_write_text
from model import default_model_args
from model.nima import check_model_args
from tools import resize_images

QUICK = {"base_model": "tiny_cnn", "batch_size": 4, "steps": 2, "warmup": 1, "num_images": 8, "infer_images": 8,
         "workers": 1}
FULL = {"base_model": "vgg16", "batch_size": 128, "steps": 20, "warmup": 3, "num_images": 512, "infer_images": None,
        "workers": min(8, os.cpu_count() or 1)}


def get_args_parser():
    p = ArgumentParser(description="Measure NIMA training and inference speed, ours vs a reference-style loop.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny_cnn at 64 px, a few steps and images")
    p.add_argument("--base_model", default=None, help="backbone (default vgg16; tiny_cnn with --quick)")
    p.add_argument("--image_size", type=int, default=None, help="crop size (default: the backbone's)")
    p.add_argument("--resize_size", type=int, default=None, help="shorter side before the crop, and the cache's size "
                                                                  "(default: the backbone's ratio, 256 for 224)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default 128; 4 with --quick)")
    p.add_argument("--infer_batch_size", type=int, default=None, help="inference batch (default: 2 x --batch_size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per training figure (default 20; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--num_images", type=int, default=None, help="AVA-like JPEGs to generate (default 512)")
    p.add_argument("--infer_images", type=int, default=None, help="images per inference figure (default: steps x infer batch)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers and resize workers (default min(8, cores))")
    p.add_argument("--data_dir", default=None, help="folder for the generated JPEGs and their cache, kept for reuse "
                                                    "(default: a temporary folder removed at the end)")
    p.add_argument("--no_compile", action="store_true", help="on CUDA, skip the torch.compile variants")
    p.add_argument("--only", default=None, help="comma-separated figure names to run (default: all)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated variants to run where they apply (default: all): {', '.join(figures.VARIANTS)}; "
                        "the JPEG figures always run main.py's default flags")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    return p


def resolve(args):
    """Fill the defaults that depend on --quick; raise ValueError on bad values."""
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.infer_batch_size = args.infer_batch_size or 2 * args.batch_size
    if args.infer_images is None:
        args.infer_images = args.steps * args.infer_batch_size
    for key in ("batch_size", "infer_batch_size", "steps", "num_images", "infer_images"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.warmup < 0 or args.workers < 0:
        raise ValueError(f"--warmup and --workers must be >= 0, got {args.warmup} and {args.workers}")
    model_args = dict(default_model_args(args.base_model))  # raises with the valid names
    if args.image_size is not None:
        # Keep the backbone's resize/crop ratio (256/224 for vgg16) unless told otherwise.
        model_args["resize_size"] = round(args.image_size * model_args["resize_size"] / model_args["image_size"])
        model_args["image_size"] = args.image_size
    if args.resize_size is not None:
        model_args["resize_size"] = args.resize_size
    if model_args["resize_size"] < model_args["image_size"]:
        raise ValueError(f"need --image_size <= --resize_size, got {model_args['image_size']} and {model_args['resize_size']}")
    check_model_args(model_args)  # the backbone's own limits (its minimum or fixed --image_size), as main.py checks them
    if args.variants:
        unknown = set(args.variants.split(",")) - set(figures.VARIANTS)
        if unknown:
            raise ValueError(f"--variants: unknown {', '.join(sorted(unknown))}; valid: {', '.join(figures.VARIANTS)}")
    only = set(args.only.split(",")) if args.only else set(figures.ALL)
    unknown = only - set(figures.ALL)
    if unknown:
        raise ValueError(f"--only: unknown figure{'s' if len(unknown) != 1 else ''} {', '.join(sorted(unknown))}; valid: {', '.join(figures.ALL)}")
    return model_args, only


def hardware(device) -> str:
    cores = f"{os.cpu_count()}-core CPU"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores}"
    name = cpu_model_name()
    return f"{cores}, no GPU" + (f" ({name})" if name else "")


def prepare_data(data_dir, args, model_args) -> dict:
    """Generated originals and their resized cache: {'original': paths, 'cache<N>': paths}."""
    originals = make_ava_like_jpegs(os.path.join(data_dir, "original"), args.num_images, seed=0)
    size = model_args["resize_size"]
    cache_dir = os.path.join(data_dir, f"cache{size}")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines and the table
        code = resize_images.main(resize_images.get_args_parser().parse_args(
            ["--src", os.path.dirname(originals[0]), "--dst", cache_dir, "--size", str(size),
             "--workers", str(args.workers), "--quiet"]))
    if code != 0:
        raise RuntimeError(f"tools/resize_images.py failed with exit code {code}")
    cached = [os.path.join(cache_dir, os.path.basename(p)) for p in originals]
    for name, paths in (("original", originals), (f"cache{size}", cached)):
        stats = folder_stats(paths)
        print(f"# {name}: {stats['images']} JPEGs, {stats['mean_kb']:.0f} KB and {stats['mean_megapixels']:.3f} Mpx "
              f"on average", file=sys.stderr)
    return {"original": originals, f"cache{size}": cached}


def rate(x: float) -> str:
    """Images/s: one decimal, or three significant digits below 10 (a CPU's VGG16 runs below 1)."""
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def print_table(records, hw: str) -> None:
    print(f"\nNIMA speed, {hw}")
    head = ("figure", "variant", "data", "images/s", "ratio", "notes")
    rows = [head]
    for r in records:
        notes = []
        if "loader_wait_ms_per_step" in r:
            notes.append(f"loader wait {r['loader_wait_ms_per_step']:.1f} ms/step")
        if "achieved_tflops" in r:
            notes.append(f"{r['achieved_tflops']:.3g} TFLOP/s")
        if "images_per_s_per_worker" in r:
            notes.append(f"{rate(r['images_per_s_per_worker'])} img/s per worker")
        ratio = f"{r['ratio']:.2f}x vs {r['ratio_to']}" if "ratio" in r else ""
        rows.append((r["figure"], r["variant"], r["data"], rate(r["images_per_s"]), ratio, "; ".join(notes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if i < 3 or i > 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(args) -> int:
    try:
        model_args, only = resolve(args)
        device = pick_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hw = hardware(device)
    common = {"device": str(device), "hardware": hw, "base_model": args.base_model, "image_size": model_args["image_size"],
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    records = []

    def emit(record):
        record = {**record, **common}
        records.append(record)
        print(json.dumps(record), flush=True)

    with tempfile.TemporaryDirectory(prefix="nima-bench-") as tmp:
        data = prepare_data(args.data_dir or tmp, args, model_args) if only & set(figures.NEED_FILES) else {}
        bench = figures.Bench(args, model_args, device, data, emit)
        for name in figures.ALL:
            if name in only:
                start = time.perf_counter()
                getattr(bench, name)()
                print(f"# {name}: measured in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print_table(records, hw)
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
