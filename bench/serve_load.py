"""Load test of the scoring service (serve.py): requests/s, images/s and latency
percentiles at several client concurrencies, beside the model called directly in a
batch loop in the same run.

    python -m bench.serve_load                         # tiny_cnn and VGG16, concurrency 1, 8, 32
    python -m bench.serve_load --models vgg16 --device cuda --out serve_load.jsonl
    python -m bench.serve_load --quick                 # smoke run: tiny_cnn, concurrency 1 and 4

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
"""
if not __package__:  # run by path (python bench/serve_load.py): run as python -m bench.serve_load
    import _by_path
    _by_path.run_as_module(__file__)

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import httpx
import numpy as np
import torch

from bench.ava_like import make_ava_like_jpegs
from bench.backbones import hardware
from dataset.images import load_rgb
from engine.distributed import pick_device
from engine.flags import ArgumentParser, HelpFormatter
from engine.score.scorer import Scorer
from fileio import atomic_write_text
from model import build_model, default_model_args, save_checkpoint

MODELS = ("tiny_cnn", "vgg16")
START_TIMEOUT_S = 300


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
    return p


def resolve(args) -> tuple:
    """(models, concurrencies); raises ValueError on bad values."""
    models = [m for m in (args.models or ("tiny_cnn" if args.quick else ",".join(MODELS))).split(",") if m]
    levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "1,8,32")).split(",") if c]
    if not models or not levels or min(levels) < 1:
        raise ValueError(f"--models and --concurrency need at least one entry, and each concurrency >= 1; "
                         f"got {args.models!r} and {args.concurrency!r}")
    args.num_images = args.num_images or (8 if args.quick else 64)
    args.workers = args.workers or (1 if args.quick else min(4, os.cpu_count() or 1))
    for flag in ("requests", "direct_images", "num_images", "max_batch", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    return models, levels


def requests_for(args, model: str, concurrency: int) -> int:
    if args.requests:
        return args.requests
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


class ServeProcess:
    def __init__(self, ckpt, args, log_path, normalize):
        self.log_path = log_path
        self.log = open(log_path, "w")
        command = [sys.executable, os.path.join(ROOT, "serve.py"), "--model", ckpt, "--host", "127.0.0.1", "--port", "0",
                   "--device", str(pick_device(args.device)), "--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms),
                   "--workers", str(args.workers), "--log_level", "warning"]
        command += ["--normalize", normalize] if normalize else []
        env = {k: v for k, v in os.environ.items() if k != "NIMA_API_KEY"}
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = None

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}:\n{self.output()}")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.output())
            if found:
                try:
                    if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                        self.url = found.group(1)
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"serve.py was not ready after {START_TIMEOUT_S} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def drive(url, bodies, concurrency: int, n: int) -> dict:
    """n requests from `concurrency` clients, each sending the next body when its answer
    comes; returns the wall time and each request's latency."""
    latencies, statuses = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        turns = iter(range(n))

        async def one_client():
            for i in turns:
                start = time.perf_counter()
                r = await client.post("/score", content=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - start)
                statuses.append(r.status_code)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"seconds": wall, "latencies": latencies, "errors": sum(s != 200 for s in statuses)}


def batch_totals(url) -> tuple:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = [float(re.search(rf"^nima_batch_size_{k} (\S+)$", text, re.MULTILINE).group(1)) for k in ("count", "sum")]
    return tuple(values)


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
            n_direct = args.direct_images or (16 if args.quick else 256 if model == "tiny_cnn" else 64)
            direct = {"mode": "direct", **common, **measure_direct(ckpt, [paths[i % len(paths)] for i in range(n_direct)],
                                                                   str(device), args.max_batch, normalize_flag(model))}
            records.append(direct)
            print(json.dumps(direct), flush=True)
            server = ServeProcess(ckpt, args, os.path.join(tmp, f"serve_{model}.log"), normalize_flag(model))
            try:
                server.wait_ready()
                for c in levels:
                    figure = {"mode": "service", **common, **measure_service(server, bodies, c, requests_for(args, model, c))}
                    figure["ratio_to_direct"] = figure["images_per_s"] / direct["images_per_s"]
                    records.append(figure)
                    print(json.dumps(figure), flush=True)
            finally:
                server.stop()
            if server.proc.returncode != 0:
                print(f"error: serve.py exited with {server.proc.returncode}:\n{server.output()}", file=sys.stderr)
                return 1
    print(table(records))
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
