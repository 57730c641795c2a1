"""Load test of the scoring service (serve.py): requests/s, images/s and latency
percentiles at several client concurrencies, beside the model called directly in a
batch loop in the same run.

    python -m bench.serve_load                         # tiny_cnn and VGG16, concurrency 1, 8, 32
    python -m bench.serve_load --models vgg16 --device cuda --out serve_load.jsonl
    python -m bench.serve_load --quick                 # smoke run: tiny_cnn, concurrency 1 and 4
    python -m bench.serve_load --adversarial           # honest clients with and without an attack

For each model (random weights: tiny_cnn in our checkpoint format, VGG16 in the
reference's released state_dict format), on AVA-like JPEGs (bench/ava_like.py):
  direct   Scorer.score over the files, batches of --max_batch: decode, transform and
           forward pass in one process, as a notebook would (forward_images_per_s: the
           forward passes alone, on inputs prepared beforehand)
  service  serve.py in a subprocess on a loopback port, driven by --concurrency clients
           (httpx, one image per request as the raw body) after `concurrency` untimed
           requests; mean_batch is the service's images per forward pass (from /metrics)
ratio_to_direct = service images/s / direct images/s. The clients run on the same
machine and take CPU from the service: on a small machine the figures are a floor.
Prints one JSON line per figure, then a table; every line names the hardware.

--adversarial: instead, per model and concurrency, the honest clients' latency alone
(phase baseline), then beside an attack (bench/attacks.py, in a process of its own:
--attack_idle connections sending nothing, --attack_slow headers and as many bodies at
one byte a second, --attack_bombs_per_s scan, pixel and memory bombs in turn,
--attack_uploads_per_s 16 MB non-images), against one serve.py with its default limits;
p99_ratio = p99 under attack / p99 alone (the goal: at most 3).
"""
if not __package__:  # run by path (python bench/serve_load.py): run as python -m bench.serve_load
    import _by_path
    _by_path.run_as_module(__file__)

import asyncio
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from bench.attacks import AttackMix, adversarial_table, measure_adversarial
from bench.ava_like import make_ava_like_jpegs
from bench.backbones import hardware
from bench.serve_clients import ServeProcess, batch_totals, drive
from dataset.images import load_rgb
from engine.distributed import pick_device
from engine.flags import ArgumentParser, HelpFormatter
from engine.score.scorer import Scorer
from fileio import atomic_write_text
from model import build_model, default_model_args, save_checkpoint

MODELS = ("tiny_cnn", "vgg16")


def get_args_parser():
    p = ArgumentParser(description="Load test of serve.py against the model called directly.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny_cnn, concurrency 1 and 4, a few requests")
    p.add_argument("--models", default=None, help=f"comma-separated backbones (default {','.join(MODELS)}; tiny_cnn with --quick)")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,8,32; 1,4 with --quick)")
    p.add_argument("--requests", type=int, default=None,
                   help="timed requests per concurrency (default: tiny_cnn max(256, 8 x c), others max(16, 2 x c); 16 with --quick)")
    p.add_argument("--direct_images", type=int, default=None,
                   help="images of the direct figure (default 256 for tiny_cnn, 64 for others; 16 with --quick)")
    p.add_argument("--num_images", type=int, default=None, help="distinct AVA-like JPEGs sent in turn (default 64; 8 with --quick)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, for the service and the direct figure")
    p.add_argument("--max_batch", type=int, default=32, help="serve.py --max_batch, and the direct figure's batch")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="serve.py --max_wait_ms")
    p.add_argument("--workers", type=int, default=None,
                   help="serve.py --workers, decoding processes (default min(4, cores); 1 with --quick)")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    g = p.add_argument_group("--adversarial: honest clients with and without an attack")
    g.add_argument("--adversarial", action="store_true",
                   help="measure the honest clients alone, then beside an attack (default models: tiny_cnn; "
                        "concurrency 8; 400 requests a phase; --quick: 4 and 40)")
    g.add_argument("--attack_idle", type=int, default=None, help="connections that send nothing (default: 300; 20 with --quick)")
    g.add_argument("--attack_slow", type=int, default=None,
                   help="headers, and as many bodies, sent at one byte a second (default: 20; 2 with --quick)")
    g.add_argument("--attack_bombs_per_s", type=float, default=10.0, help="scan, pixel and memory bombs a second, in turn")
    g.add_argument("--attack_uploads_per_s", type=float, default=1.0, help="16 MB bodies that are not images, a second")
    g.add_argument("--attack_warmup_s", type=float, default=3.0, help="attack running before the honest clients start")
    return p


def resolve(args) -> tuple:
    """(models, concurrencies); raises ValueError on bad values."""
    models = [m for m in (args.models or ("tiny_cnn" if args.quick or args.adversarial else ",".join(MODELS))).split(",") if m]
    default_levels = ("4" if args.quick else "8") if args.adversarial else ("1,4" if args.quick else "1,8,32")
    levels = [int(c) for c in (args.concurrency or default_levels).split(",") if c]
    if not models or not levels or min(levels) < 1:
        raise ValueError(f"--models and --concurrency need at least one entry, and each concurrency >= 1; "
                         f"got {args.models!r} and {args.concurrency!r}")
    args.num_images = args.num_images or (8 if args.quick else 64)
    args.attack_idle = args.attack_idle if args.attack_idle is not None else (20 if args.quick else 300)
    args.attack_slow = args.attack_slow if args.attack_slow is not None else (2 if args.quick else 20)
    if min(args.attack_idle, args.attack_slow) < 0 or min(args.attack_bombs_per_s, args.attack_uploads_per_s) < 0:
        raise ValueError("the --attack_ flags must be >= 0")
    args.workers = args.workers or (1 if args.quick else min(4, os.cpu_count() or 1))
    for flag in ("requests", "direct_images", "num_images", "max_batch", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    return models, levels


def requests_for(args, model: str, concurrency: int) -> int:
    if args.requests:
        return args.requests
    if args.adversarial:
        return 40 if args.quick else 400
    if args.quick:
        return 16
    return max(256, 8 * concurrency) if model == "tiny_cnn" else max(16, 2 * concurrency)


def make_checkpoint(model: str, folder: str) -> str:
    """Random weights: tiny_cnn in our checkpoint format, VGG16 as the reference's bare
    state_dict (the released epoch-82.pth layout), so both loaders are exercised."""
    torch.manual_seed(0)
    model_args = default_model_args(model)
    net = build_model(model_args, pretrained="none")
    path = os.path.join(folder, f"{model}.pth")
    if model == "vgg16":
        torch.save(net.state_dict(), path)
    else:
        save_checkpoint(path, {"model": net.state_dict(), "model_args": model_args})
    return path


def normalize_flag(model: str):
    """The released format does not record its input normalisation: say it (the 2018 release's)."""
    return "none" if model == "vgg16" else None


def measure_direct(ckpt, paths, device, batch_size, normalize) -> dict:
    scorer = Scorer.from_checkpoint(ckpt, device=device, batch_size=batch_size, normalize=normalize)
    scorer.score(paths[:min(len(paths), batch_size)])  # warm-up: first-call set-up, file cache
    start = time.perf_counter()
    scorer.score(paths)
    seconds = time.perf_counter() - start
    inputs = [scorer.preprocess(load_rgb(p)) for p in paths[:batch_size]]
    scorer.score_tensors(inputs)
    start = time.perf_counter()
    rounds = max(1, len(paths) // batch_size)
    for _ in range(rounds):
        scorer.score_tensors(inputs)
    forward = rounds * len(inputs) / (time.perf_counter() - start)
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
            "forward_images_per_s": forward}


def measure_service(server, bodies, concurrency: int, n: int) -> dict:
    asyncio.run(drive(server.url, bodies, concurrency, concurrency))  # warm-up, untimed
    count0, sum0 = batch_totals(server.url)
    run = asyncio.run(drive(server.url, bodies, concurrency, n))
    count1, sum1 = batch_totals(server.url)
    ms = np.asarray(run["latencies"]) * 1000.0
    return {"concurrency": concurrency, "requests": n, "images": n, "seconds": run["seconds"],
            "requests_per_s": n / run["seconds"], "images_per_s": n / run["seconds"],
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": run["errors"],
            "mean_batch": (sum1 - sum0) / max(count1 - count0, 1)}


def table(records) -> str:
    lines = [f"{'model':<10} {'mode':<8} {'conc':>4} {'req/s':>8} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} "
             f"{'p99 ms':>8} {'batch':>6} {'vs direct':>9}"]
    for r in records:
        if r["mode"] == "direct":
            lines.append(f"{r['base_model']:<10} {'direct':<8} {'':>4} {'':>8} {r['images_per_s']:>9.1f} {'':>8} {'':>8} "
                         f"{'':>8} {r['max_batch']:>6} {'':>9}   (forward passes alone: {r['forward_images_per_s']:.1f} images/s)")
        else:
            lines.append(f"{r['base_model']:<10} {'service':<8} {r['concurrency']:>4} {r['requests_per_s']:>8.1f} "
                         f"{r['images_per_s']:>9.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                         f"{r['mean_batch']:>6.1f} {r['ratio_to_direct']:>8.0%}")
    return "\n".join(lines)


def main(args) -> int:
    try:
        models, levels = resolve(args)
        device = pick_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hw = hardware() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU")
    print(f"hardware: {hw}", flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        paths = make_ava_like_jpegs(os.path.join(tmp, "images"), args.num_images, seed=0)
        bodies = [open(p, "rb").read() for p in paths]
        for model in models:
            common = {"base_model": model, "device": str(device), "hardware": hw, "max_batch": args.max_batch,
                      "max_wait_ms": args.max_wait_ms, "workers": args.workers,
                      "image_size": default_model_args(model)["image_size"]}
            ckpt = make_checkpoint(model, tmp)
            if not args.adversarial:
                n_direct = args.direct_images or (16 if args.quick else 256 if model == "tiny_cnn" else 64)
                direct = {"mode": "direct", **common, **measure_direct(ckpt, [paths[i % len(paths)] for i in range(n_direct)],
                                                                       str(device), args.max_batch, normalize_flag(model))}
                records.append(direct)
                print(json.dumps(direct), flush=True)
            server = ServeProcess(ckpt, args, os.path.join(tmp, f"serve_{model}.log"), normalize_flag(model), device)
            try:
                server.wait_ready()
                for c in levels:
                    n = requests_for(args, model, c)
                    if args.adversarial:
                        figures = [{"mode": "adversarial", **common, **r}
                                   for r in measure_adversarial(server.url, bodies, c, n, attack_mix(args), args.attack_warmup_s)]
                    else:
                        figure = {"mode": "service", **common, **measure_service(server, bodies, c, n)}
                        figure["ratio_to_direct"] = figure["images_per_s"] / direct["images_per_s"]
                        figures = [figure]
                    records += figures
                    for figure in figures:
                        print(json.dumps(figure), flush=True)
            finally:
                server.stop()
            if server.proc.returncode != 0:
                print(f"error: serve.py exited with {server.proc.returncode}:\n{server.output()}", file=sys.stderr)
                return 1
    print(adversarial_table(records) if args.adversarial else table(records))
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    return 0


def attack_mix(args) -> AttackMix:
    return AttackMix(idle=args.attack_idle, slow_headers=args.attack_slow, slow_bodies=args.attack_slow,
                     bombs_per_s=args.attack_bombs_per_s, uploads_per_s=args.attack_uploads_per_s)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
