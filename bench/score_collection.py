"""test.py on a collection, as whole processes: images/s (start-up included) and peak
memory (PSS of the process tree) scoring N cached JPEGs from a folder and from tar
shards, with 1 and 2 processes (torchrun).

    python -m bench.score_collection [--images 20000] [--device cpu] [--out results.jsonl]
    python -m bench.score_collection --device cuda --gpu_decode   # each run also with test.py --gpu_decode
    python -m bench.score_collection --quick      # 60 images, 2 of the runs: a smoke run (the test suite runs it)

The model is tiny_cnn at its own size (64 px crops of a 72 px resize, random weights),
so the data path (listing or tar reading, JPEG decoding, resizing, batching, part
files, merge) is what is timed. The JPEGs are "cached" ones (tools/resize_images.py:
shorter side 256, about 26 KB): 64 distinct AVA-like photos, each file a copy of one.

Every process runs with OMP_NUM_THREADS=1 (--threads), as torchrun sets it for its
workers, so 1 and 2 processes differ in the number of processes only. (With torch's
default of one thread per core beside a loader worker, a 2-core machine shared with
other jobs measured anywhere from 1.2x to 5x slower than with one thread: the idle
OpenMP threads spin and starve the decoding worker.)
"""
if not __package__:  # run by path (python bench/score_collection.py): run as python -m bench.score_collection
    import _by_path
    _by_path.run_as_module(__file__)

import os
import shutil
import subprocess
import sys
import tempfile

from bench.cpu_scoring import ROOT, append_jsonl, run_measured
from engine.flags import ArgumentParser

POOL = 64
def prepare(folder, n, shard_size, pool_size=POOL) -> tuple:
    """(checkpoint, image folder, shard spec): reused when already there."""
    import io

    import numpy as np
    import torch

    from bench.ava_like import ava_like_image
    from model import build_model, default_model_args, save_checkpoint
    ckpt = os.path.join(folder, "tiny_cnn.pth")
    if not os.path.exists(ckpt):
        torch.manual_seed(0)
        model_args = default_model_args("tiny_cnn")
        save_checkpoint(ckpt, {"model": build_model(model_args).state_dict(), "model_args": model_args})
    images = os.path.join(folder, f"images_{n}")
    if not os.path.isdir(images):
        pool = []
        for k in range(pool_size):
            img = ava_like_image(np.random.default_rng([7, k]))
            img = img.resize((round(img.width * 256 / img.height), 256))  # the cache's shorter side
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            pool.append(buf.getvalue())
        tmp = images + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for i in range(n):
            sub = os.path.join(tmp, f"{i // 1000:04d}")
            if i % 1000 == 0:
                os.makedirs(sub)
            with open(os.path.join(sub, f"img{i:07d}.jpg"), "wb") as f:
                f.write(pool[i % pool_size])
        os.rename(tmp, images)
    shards = os.path.join(folder, f"shards_{n}")
    if not os.path.isdir(shards):
        subprocess.run([sys.executable, "-m", "tools.make_shards", "--src", images, "--out", shards + ".tmp",
                        "--shard_size", str(shard_size), "--quiet", "--overwrite"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        os.rename(shards + ".tmp", shards)
    count = len([f for f in os.listdir(shards) if f.endswith(".tar")])
    return ckpt, images, os.path.join(shards, "{" + f"{0:06d}..{count - 1:06d}" + "}.tar"), count


def get_args_parser():
    p = ArgumentParser(description="test.py on a collection: folder vs shards, 1 vs 2 processes.",
                       allow_abbrev=False)
    p.add_argument("--images", type=int, default=20000, help="number of cached JPEGs")
    p.add_argument("--shard_size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (2 processes need 2 GPUs there)")
    p.add_argument("--data", default=None, help="folder for the images, shards and checkpoint (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (0: torch's default)")
    p.add_argument("--out", default=None, help="also append one JSON line per run to this file")
    p.add_argument("--gpu_decode", action="store_true",
                   help="each run also with test.py --gpu_decode (the JPEGs decoded on --device in the main process)")
    p.add_argument("--quick", action="store_true",
                   help="60 images (4 distinct) in shards of 20, the folder with 1 process and the shards with 2: a smoke run")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.images, args.shard_size = 60, 20
    if args.threads > 0:  # inherited by every command below (torchrun keeps a value it is given)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or tmp
        os.makedirs(folder, exist_ok=True)
        ckpt, images, shards, count = prepare(folder, args.images, args.shard_size, 4 if args.quick else POOL)
        common = ["--model", ckpt, "--quiet", "--device", args.device]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "test.py"]
        runs = [("folder", 1, "test.py", [sys.executable, "test.py", "--test_images", images]),
                ("folder", 2, "test.py", [*torchrun, "--test_images", images]),
                ("shards", 1, "test.py", [sys.executable, "test.py", "--test_images", shards]),
                ("shards", 2, "test.py", [*torchrun, "--test_images", shards])]
        if args.quick:  # each kind of run once: one process, torchrun, a folder, shards
            runs = [runs[0], runs[3]]
        if args.gpu_decode:
            runs = [run for source, procs, path, cmd in runs
                    for run in ((source, procs, path, cmd), (source, procs, path + " --gpu_decode", cmd + ["--gpu_decode"]))]
        rows = []
        print(f"{args.images} cached JPEGs, {count} shards, tiny_cnn on {args.device}, {os.cpu_count()} cores, "
              f"OMP_NUM_THREADS={args.threads or 'default'}")
        print(f"{'source':<8} {'procs':>5} {'path':<22} {'wall s':>7} {'images/s':>9} {'peak PSS MB':>12}")
        for n, (source, procs, path, cmd) in enumerate(runs):
            out = os.path.join(tmp, f"out{n}")
            m = run_measured(cmd + [*common, "--predictions", out])
            row = {"source": source, "processes": procs, "path": path, "images": args.images, "shards": count,
                   "device": args.device, "cores": os.cpu_count(), "omp_threads": args.threads, **m, "images_per_s": args.images / m["wall_s"]}
            rows.append(row)
            print(f"{source:<8} {procs:>5} {path:<22} {m['wall_s']:>7.2f} {row['images_per_s']:>9.0f} "
                  f"{m['peak_pss_mb']:>12.0f}")
            with open(os.path.join(out, "predictions.csv")) as f:
                scored = sum(1 for _ in f) - 1
            if scored != args.images:
                raise RuntimeError(f"{source}, {procs} process(es): {scored} of {args.images} images in predictions.csv")
        if args.out:
            append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
