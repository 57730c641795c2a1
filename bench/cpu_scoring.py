"""test.py against a reference-style per-image loop on the CPU, as whole processes:
wall time (start-up included), CPU time and peak memory (PSS) of the process tree
(DataLoader workers included), paired run by run, for 1, 32 and 256 photos.

    python -m bench.cpu_scoring [--sizes 1 32 256] [--repeats 3] [--out results.jsonl]
    python -m bench.cpu_scoring --quick      # 1 photo, one run each: a smoke run (the test suite runs it)

The model is VGG16 in the reference's released format (random weights: speed does not
depend on them); the photos are AVA-like 640x427 JPEGs. Also printed: the bare
`import torch, torchvision` time, the floor of any PyTorch scoring process.
"""
if not __package__:  # run by path (python bench/cpu_scoring.py): run as python -m bench.cpu_scoring
    import _by_path
    _by_path.run_as_module(__file__)

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from engine.flags import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def append_jsonl(path, rows) -> None:
    """Add one JSON line per row to `path`: results of several runs collect in one file."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and all its descendants (from /proc): pages
    shared between them (a forked DataLoader worker shares its parent's) count once in
    total, not once per process as summed RSS would. 0 once the process is gone."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run_measured(cmd) -> dict:
    """Run `cmd` from the repository root: wall seconds, CPU seconds (user + system of the
    process and its waited-for children, from the rusage of this process's children) and
    the peak memory (PSS) of its process tree, sampled every 10 ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss_bytes(proc.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_pss_mb": peak / 2**20}


def prepare(folder, sizes) -> tuple:
    """A released-format VGG16 checkpoint and one folder of AVA-like JPEGs per size."""
    import torch

    from bench.ava_like import make_ava_like_jpegs
    from model import build_model, default_model_args
    ckpt = os.path.join(folder, "vgg16_released.pth")
    if not os.path.exists(ckpt):
        torch.manual_seed(0)
        torch.save(build_model(default_model_args("vgg16")).state_dict(), ckpt)
    dirs = {}
    for n in sizes:
        dirs[n] = os.path.join(folder, f"photos_{n}")
        if not (os.path.isdir(dirs[n]) and len(os.listdir(dirs[n])) == n):
            make_ava_like_jpegs(dirs[n], n, seed=n)
    return ckpt, dirs


def get_args_parser():
    p = ArgumentParser(description="test.py vs a reference-style per-image loop, on the CPU.", allow_abbrev=False)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 256], help="numbers of photos")
    p.add_argument("--repeats", type=int, default=3, help="paired runs per size (medians reported)")
    p.add_argument("--data", default=None, help="folder for the photos and checkpoint (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also append one JSON line per size to this file")
    p.add_argument("--quick", action="store_true", help="1 photo, one repeat: a smoke run")
    p.add_argument("--test_args", nargs=argparse.REMAINDER, default=[], help="extra test.py flags (last on the line)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [1], 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or tmp
        os.makedirs(folder, exist_ok=True)
        ckpt, dirs = prepare(folder, args.sizes)
        imports = [run_measured([sys.executable, "-c", "import torch, torchvision"])["wall_s"] for _ in range(args.repeats)]
        print(f"bare 'import torch, torchvision': {statistics.median(imports):.2f} s (median of {args.repeats})")
        print(f"{'photos':>6}  {'test.py wall':>12} {'ref wall':>9} {'ratio':>6}  {'test.py cpu':>11} {'ref cpu':>8}  "
              f"{'test.py MB':>10} {'ref MB':>7}")
        rows = []
        for n in args.sizes:
            ours, ref = [], []
            for r in range(args.repeats):  # paired and alternating, so drifting load hits both alike
                out = os.path.join(tmp, f"out_{n}_{r}")
                pair = [lambda: ours.append(run_measured([sys.executable, "test.py", "--model", ckpt, "--test_images", dirs[n],
                                                            "--predictions", out, "--quiet", "--device", "cpu",
                                                            *args.test_args])),
                        lambda: ref.append(run_measured([sys.executable, "-m", "bench.reference_loop", "--model", ckpt,
                                                           "--images", dirs[n], "--out", out + "_ref.txt"]))]
                for run in (pair if r % 2 == 0 else pair[::-1]):
                    run()
            med = {k: (statistics.median(x[k] for x in ours), statistics.median(x[k] for x in ref))
                   for k in ("wall_s", "cpu_s", "peak_pss_mb")}
            row = {"photos": n, "repeats": args.repeats, "import_torch_torchvision_s": statistics.median(imports),
                   **{f"test_py_{k}": v[0] for k, v in med.items()}, **{f"reference_{k}": v[1] for k, v in med.items()},
                   "wall_ratio": med["wall_s"][0] / med["wall_s"][1],
                   "wall_ratios_by_run": [o["wall_s"] / f["wall_s"] for o, f in zip(ours, ref)]}
            rows.append(row)
            print(f"{n:>6}  {med['wall_s'][0]:>11.2f}s {med['wall_s'][1]:>8.2f}s {row['wall_ratio']:>6.2f}  "
                  f"{med['cpu_s'][0]:>10.2f}s {med['cpu_s'][1]:>7.2f}s  {med['peak_pss_mb'][0]:>10.0f} {med['peak_pss_mb'][1]:>7.0f}")
        if args.out:
            append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
