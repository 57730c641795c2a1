"""The pieces of bench/gpu_check.sh that are Python, one subcommand each: describe the
machine and measure its matrix and copy rates (bench/gpu_machine.py), make the data, run
a command and record it (here), run main.py with its compilations and peak memory
counted and profile training steps (bench/gpu_training.py), check a training run's
outputs, compare two prediction files and print the summary (bench/gpu_records.py).

Every record goes to the JSONL file named by $GPU_CHECK_JSONL (one JSON object per
line, each with the step from $GPU_CHECK_STEP); see bench/GPU.md.

    python -m bench.gpu_steps env
    python -m bench.gpu_steps peak
    python -m bench.gpu_steps data DIR --images 10000 --size 256 --workers 16
    python -m bench.gpu_steps ckpt PATH --base_model vgg16
    python -m bench.gpu_steps run --name NAME --log LOG [--timeout S] [--images N] [--parse pytest|bench]
                              [--merge JSON] [--records JSONL] -- COMMAND ...
    python -m bench.gpu_steps main --json OUT.json -- MAIN.PY ARGS      (also under torchrun)
    python -m bench.gpu_steps check_run CKPT_DIR --epochs 3
    python -m bench.gpu_steps compare --name NAME PRED_DIR_A PRED_DIR_B
    python -m bench.gpu_steps marginal --name NAME --small RUN_NAME --big RUN_NAME
    python -m bench.gpu_steps card
    python -m bench.gpu_steps profile DIR [--steps 10]
    python -m bench.gpu_steps summary JSONL
"""
if not __package__:  # run by path (python bench/gpu_steps.py): run as python -m bench.gpu_steps
    import _by_path
    _by_path.run_as_module(__file__)

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

from bench.gpu_machine import card_slug, cmd_env, cmd_peak
from bench.gpu_records import cmd_check_run, cmd_compare, cmd_marginal, cmd_recompiles, cmd_summary, emit
from bench.gpu_training import cmd_main, cmd_profile
from engine.flags import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----- data -----

def _write_ava_like(job):
    from bench.ava_like import ava_like_image
    from fileio import atomic_path
    import numpy as np
    path, seed, n, width, height = job
    with atomic_path(path) as tmp:
        ava_like_image(np.random.default_rng([seed, n]), width, height).save(tmp, "JPEG", quality=90)
    return path


def cmd_data(args) -> int:
    """AVA-like JPEGs in DIR/original, named and drawn as bench/ava_like.py's
    make_ava_like_jpegs would (so bench.py --data_dir DIR reuses them), written by a
    process pool; the resized cache in DIR/cache<size> (tools/resize_images.py); label
    CSVs of random votes for the first --train, next --val and first --test images."""
    import multiprocessing

    import numpy as np

    from bench.ava_like import PORTRAIT_FRACTION, make_ava_like_jpegs
    from tools import resize_images

    start = time.perf_counter()
    original = os.path.join(args.dir, "original")
    os.makedirs(original, exist_ok=True)
    # The size draws of make_ava_like_jpegs, in its order; it then finds every file written.
    rng, jobs = np.random.default_rng(args.seed), []
    for n in range(args.images):
        portrait = rng.random() < PORTRAIT_FRACTION
        short = int(rng.integers(400, 461))
        width, height = (short, 640) if portrait else (640, short)
        path = os.path.join(original, f"ava{n:06d}.jpg")
        if not os.path.exists(path):
            jobs.append((path, args.seed, n, width, height))
    if jobs:
        with multiprocessing.Pool(args.workers) as pool:
            for _ in pool.imap_unordered(_write_ava_like, jobs, chunksize=16):
                pass
    paths = make_ava_like_jpegs(original, args.images, seed=args.seed)
    generated = time.perf_counter()
    cache = os.path.join(args.dir, f"cache{args.size}")
    code = resize_images.main(resize_images.get_args_parser().parse_args(
        ["--src", original, "--dst", cache, "--size", str(args.size), "--workers", str(args.workers), "--quiet"]))
    ids = [os.path.basename(p) for p in paths]
    votes = np.random.default_rng(args.seed + 1).integers(0, 30, size=(len(ids), 10)) + 1
    splits = {"train": range(0, args.train), "val": range(args.train, args.train + args.val),
              "test": range(0, args.test), "all": range(len(ids))}
    for name, rows in splits.items():
        with open(os.path.join(args.dir, f"{name}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            for i in rows:
                writer.writerow([ids[i], *votes[i].tolist()])
    emit({"name": "data_files", "images": len(paths), "written": len(jobs), "cache": cache, "resize_exit_code": code,
          "generate_seconds": generated - start, "resize_seconds": time.perf_counter() - generated})
    return 0 if code == 0 else 1


def cmd_ckpt(args) -> int:
    """A checkpoint of ours with random weights, for timing test.py without training."""
    import torch
    from model import build_model, default_model_args, save_checkpoint
    model_args = default_model_args(args.base_model)
    torch.manual_seed(0)
    model = build_model(model_args, pretrained="none")
    save_checkpoint(args.path, {"model": model.state_dict(), "model_args": model_args, "epoch": 0})
    return 0


# ----- running commands -----

def _pytest_counts(text: str) -> dict:
    """Counts from pytest's last summary line, and the failing test ids."""
    counts = {}
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if summary:
        for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", summary[-1]):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    counts["failing"] = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)))
    return counts


def cmd_run(args) -> int:
    """Run COMMAND with its output in --log, stop its whole process group after
    --timeout seconds, and record exit code, seconds and what the output says."""
    if not args.command:
        raise SystemExit("run: no command after --")
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    start = time.perf_counter()
    timed_out = False
    with open(args.log, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(args.command)}\n")
        log.flush()
        proc = subprocess.Popen(args.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    seconds = time.perf_counter() - start
    with open(args.log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    rec = {"name": args.name, "rc": rc, "seconds": round(seconds, 2), "timed_out": timed_out,
           "log": os.path.basename(args.log)}
    if args.images:
        rec["images"] = args.images
        rec["images_per_s_wall"] = args.images / seconds
    if args.parse == "pytest":
        rec.update(_pytest_counts(text))
    if args.merge and os.path.exists(args.merge):
        with open(args.merge, encoding="utf-8") as f:
            rec.update(json.load(f))
    if args.parse == "bench":
        # bench.py prints each figure as a JSON line as soon as it is measured: keep them
        # all, also when the run was stopped part way.
        figures = [json.loads(line) for line in text.splitlines() if line.startswith("{\"figure\"")]
        rec["figures"] = len(figures)
        for fig in figures:
            emit({"name": f"{args.name}/{fig.pop('figure')}", **fig})
    if args.records and os.path.exists(args.records):
        # bench/serve_load.py's JSON lines: one per mode (direct, or the service at a concurrency).
        with open(args.records, encoding="utf-8") as f:
            for line in filter(str.strip, f):
                r = json.loads(line)
                at = f"/c{r['concurrency']}" if "concurrency" in r else ""
                emit({"name": f"{args.name}/{r.get('base_model', '')}/{r.get('mode', '')}{at}", **r})
    emit(rec)
    if rc != 0:
        tail = text[-3000:]
        print(f"--- {args.name} exited {rc}{' (timed out)' if timed_out else ''}; end of {args.log}:\n{tail}", flush=True)
    return 0  # the step goes on; the record says what failed


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    s = sub.add_parser("peak")
    s.add_argument("--matrix", type=int, default=8192)
    s.add_argument("--copy_gib", type=int, default=2)
    s.add_argument("--reps", type=int, default=10)
    s = sub.add_parser("data")
    s.add_argument("dir")
    s.add_argument("--images", type=int, default=10000)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--train", type=int, default=4000)
    s.add_argument("--val", type=int, default=1000)
    s.add_argument("--test", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("ckpt")
    s.add_argument("path")
    s.add_argument("--base_model", default="vgg16")
    s = sub.add_parser("run")
    s.add_argument("--name", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--timeout", type=float, default=None)
    s.add_argument("--images", type=int, default=0, help="images the command processes: adds images_per_s_wall")
    s.add_argument("--parse", choices=["pytest", "bench"], default=None)
    s.add_argument("--merge", default=None, help="a JSON file the command writes, merged into the record")
    s.add_argument("--records", default=None, help="a JSONL file the command writes: each line recorded on its own")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("main")
    s.add_argument("--json", default=None)
    s.add_argument("main_args", nargs=argparse.REMAINDER)
    s = sub.add_parser("recompiles")
    s.add_argument("--name", required=True)
    s.add_argument("log")
    s = sub.add_parser("check_run")
    s.add_argument("--name", required=True)
    s.add_argument("ckpt_dir")
    s.add_argument("--epochs", type=int, required=True)
    s = sub.add_parser("compare")
    s.add_argument("--name", required=True)
    s.add_argument("a")
    s.add_argument("b")
    s = sub.add_parser("marginal")
    s.add_argument("--name", required=True)
    s.add_argument("--small", required=True)
    s.add_argument("--big", required=True)
    sub.add_parser("card")
    s = sub.add_parser("profile")
    s.add_argument("dir", help="the data folder of `data` (its cache<resize_size>)")
    s.add_argument("--out", required=True)
    s.add_argument("--base_model", default="vgg16")
    s.add_argument("--batch_size", type=int, default=256)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--rows", type=int, default=30)
    s = sub.add_parser("summary")
    s.add_argument("jsonl")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    for name in ("command", "main_args"):
        if getattr(args, name, None) and getattr(args, name)[0] == "--":
            setattr(args, name, getattr(args, name)[1:])
    return {"env": cmd_env, "peak": cmd_peak, "data": cmd_data, "ckpt": cmd_ckpt, "run": cmd_run, "main": cmd_main,
            "recompiles": cmd_recompiles, "check_run": cmd_check_run, "compare": cmd_compare,
            "marginal": cmd_marginal, "card": lambda _a: print(card_slug()) or 0,
            "profile": cmd_profile, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
