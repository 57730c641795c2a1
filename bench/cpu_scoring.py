"""test.py on a CPU against a reference-style per-image loop, as whole processes: wall time
(start-up included), CPU time and peak memory (PSS) of the process tree (DataLoader
workers included), for 1, 32, 256 and 1,000 photos of two kinds, and the steady rate.

    python -m bench.cpu_scoring [--sizes 1 32 256 1000] [--sets ava camera] [--repeats 1] [--out results.jsonl]
    python -m bench.cpu_scoring --quick      # 1 photo, one run each: a smoke run (the test suite runs it)

Four ways to score the same photos with the same released-format VGG16 (random weights:
speed does not depend on them), run in turns so that drifting load hits all alike:
  reference  python -m bench.reference_loop: the whole torchvision VGG16 built, then one
             image at a time, full decode, float32
  old        test.py with the defaults it had before bf16 and draft decoding on a CPU:
             --amp off --channels_last off --exact_decode
  new        test.py with its defaults (what 'auto' picks on this CPU; printed)
  bf16       test.py with its defaults and --amp on (faster where the CPU has native bf16;
             not auto for VGG16, whose scores it moves beyond the bounds of bench/score_cost.py)
Photo sets: ava, AVA-like 640 x 427 JPEGs (bench/ava_like.py); camera, 12-megapixel JPEGs
(4000 x 3000) upscaled from the real photographs of tests/data/photos, 64 distinct
files hard-linked up to the count (decoding is the same work; 1,000 such files would
take gigabytes). The steady rate of a way is (N2 - N1) / (wall(N2) - wall(N1)) over the
two largest sizes: start-up and the model's load cancel out. Also printed: the bare
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


CAMERA_DISTINCT = 64
WAYS = ("reference", "old", "new", "bf16")
OLD_DEFAULTS = ["--amp", "off", "--channels_last", "off", "--exact_decode"]


def prepare(folder, sizes, sets) -> tuple:
    """A released-format VGG16 checkpoint and one folder of photos per (set, size)."""
    import torch

    from bench.ava_like import camera_like_jpegs, make_ava_like_jpegs
    from model import build_model, default_model_args
    ckpt = os.path.join(folder, "vgg16_released.pth")
    if not os.path.exists(ckpt):
        torch.manual_seed(0)
        torch.save(build_model(default_model_args("vgg16")).state_dict(), ckpt)
    dirs = {}
    for kind in sets:
        for n in sizes:
            dirs[kind, n] = os.path.join(folder, f"{kind}_{n}")
            if not (os.path.isdir(dirs[kind, n]) and len(os.listdir(dirs[kind, n])) == n):
                if kind == "ava":
                    make_ava_like_jpegs(dirs[kind, n], n, seed=n)
                else:
                    camera_like_jpegs(dirs[kind, n], n, distinct=CAMERA_DISTINCT)
    return ckpt, dirs


def command(way, ckpt, images, out, test_args) -> list:
    if way == "reference":
        return [sys.executable, "-m", "bench.reference_loop", "--model", ckpt, "--images", images, "--out", out + ".txt"]
    flags = {"old": OLD_DEFAULTS, "bf16": ["--amp", "on"]}.get(way, [])
    return [sys.executable, "test.py", "--model", ckpt, "--test_images", images, "--predictions", out, "--quiet",
            "--device", "cpu", *flags, *test_args]


def what_auto_chose(ckpt, images) -> str:
    """test.py's own line about what its defaults picked on this machine."""
    proc = subprocess.run([sys.executable, "test.py", "--model", ckpt, "--test_images", images, "--quiet", "--device", "cpu",
                           "--predictions", os.path.join(tempfile.mkdtemp(), "p")], cwd=ROOT, capture_output=True, text=True)
    return next((line for line in proc.stdout.splitlines() if line.startswith("runtime:")), proc.stderr[-500:])


def steady_rate(sizes, walls) -> float:
    """Images/s between the two largest sizes (None with fewer than two)."""
    if len(sizes) < 2:
        return None
    (n1, w1), (n2, w2) = sorted(zip(sizes, walls))[-2:]
    return (n2 - n1) / (w2 - w1) if w2 > w1 else None


def get_args_parser():
    p = ArgumentParser(description="test.py vs a reference-style per-image loop, on the CPU.", allow_abbrev=False)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 256, 1000], help="numbers of photos")
    p.add_argument("--sets", nargs="+", choices=["ava", "camera"], default=["ava", "camera"],
                   help="ava: AVA-like 640x427 JPEGs; camera: 12-megapixel JPEGs")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="which ways of scoring to time")
    p.add_argument("--repeats", type=int, default=1, help="runs per size and way (medians reported)")
    p.add_argument("--data", default=None, help="folder for the photos and checkpoint (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also append one JSON line per set, size and way to this file")
    p.add_argument("--quick", action="store_true", help="1 AVA-like photo, one repeat: a smoke run")
    p.add_argument("--test_args", nargs=argparse.REMAINDER, default=[], help="extra test.py flags (last on the line)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.sets, args.repeats = [1], ["ava"], 1
    from bench.timing import cpu_model_name
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or tmp
        os.makedirs(folder, exist_ok=True)
        ckpt, dirs = prepare(folder, args.sizes, args.sets)
        load = os.getloadavg()[0]
        imports = [run_measured([sys.executable, "-c", "import torch, torchvision"])["wall_s"] for _ in range(args.repeats)]
        chose = what_auto_chose(ckpt, dirs[args.sets[0], min(args.sizes)])
        hardware = {"cpu": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "load_average_at_start": load}
        print(f"{hardware['cpu'] or 'unknown CPU'}, {hardware['cores']} cores, load average {load:.2f} at the start")
        print(f"test.py's defaults here: {chose}")
        print(f"bare 'import torch, torchvision': {statistics.median(imports):.2f} s (median of {args.repeats})")
        print(f"{'set':<7} {'photos':>6} {'way':<9} {'wall':>8} {'cpu':>8} {'peak MB':>8} {'vs reference':>12}")
        rows = []
        for kind in args.sets:
            walls = {way: [] for way in args.ways}
            for n in args.sizes:
                runs = {way: [] for way in args.ways}
                for r in range(args.repeats):  # in turns, reversed every other repeat, so drifting load hits all alike
                    order = args.ways if r % 2 == 0 else args.ways[::-1]
                    for way in order:
                        out = os.path.join(tmp, f"out_{kind}_{n}_{way}_{r}")
                        runs[way].append(run_measured(command(way, ckpt, dirs[kind, n], out, args.test_args)))
                for way in args.ways:
                    med = {k: statistics.median(x[k] for x in runs[way]) for k in ("wall_s", "cpu_s", "peak_pss_mb")}
                    walls[way].append(med["wall_s"])
                    row = {"set": kind, "photos": n, "way": way, "repeats": args.repeats, **med, **hardware,
                           "import_torch_torchvision_s": statistics.median(imports), "auto_chose": chose,
                           "walls_by_run": [x["wall_s"] for x in runs[way]]}
                    ref = [x for x in rows if x["set"] == kind and x["photos"] == n and x["way"] == "reference"]
                    if ref and way != "reference":
                        row["speedup_vs_reference"] = ref[0]["wall_s"] / med["wall_s"]
                    rows.append(row)
                    speedup = f"{row['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in row else "-"
                    print(f"{kind:<7} {n:>6} {way:<9} {med['wall_s']:>7.2f}s {med['cpu_s']:>7.2f}s "
                          f"{med['peak_pss_mb']:>8.0f} {speedup:>12}", flush=True)
            for way in args.ways:
                rate = steady_rate(args.sizes, walls[way])
                if rate is not None:
                    print(f"{kind:<7} steady rate of {way}: {rate:.2f} images/s (between the two largest sizes)")
                    rows.append({"set": kind, "way": way, "steady_images_per_s": rate, "sizes": sorted(args.sizes)[-2:],
                                 **hardware})
        if args.out:
            append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
