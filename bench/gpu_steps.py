"""The pieces of bench/gpu_check.sh that are Python: describe the machine, measure its
matrix and copy rates, make the data, run a command and record it, run main.py with
its compilations and peak memory counted, check a training run's outputs, compare
two prediction files, profile training steps, and print the summary.

Every record goes to the JSONL file named by $GPU_CHECK_JSONL (one JSON object per
line, each with the step from $GPU_CHECK_STEP); see bench/GPU.md.

    python -m bench.gpu_steps env
    python -m bench.gpu_steps peak
    python -m bench.gpu_steps data DIR --images 10000 --size 256 --workers 16
    python -m bench.gpu_steps ckpt PATH --base_model vgg16
    python -m bench.gpu_steps run --name NAME --log LOG [--timeout S] [--images N] [--parse pytest|bench]
                              [--merge JSON] -- COMMAND ...
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
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

from engine.flags import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Packages the GPU machine's image lacks and bench/gpu_prepare.sh brings as wheels.
CARRIED = ("tensorboardX", "fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "python-multipart",
           "prometheus-client", "fastapi-offline")
METRICS_KEYS = ("epoch", "train_loss", "val_emd", "val_srcc_mean", "seconds", "images_per_second")


def emit(record: dict) -> dict:
    """Append `record` (with the step) to $GPU_CHECK_JSONL and print it."""
    record = {"step": os.environ.get("GPU_CHECK_STEP", ""), **record}
    line = json.dumps(record, default=str)
    path = os.environ.get("GPU_CHECK_JSONL")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return record


# ----- the machine -----

def card_slug() -> str:
    """'h200' for 'NVIDIA H200': the <card> of bench/results/<date>_<card>.jsonl."""
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def cmd_env(_args) -> int:
    import torch
    import torchvision
    from importlib import metadata
    rec = {"name": "env", "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "cuda_available": torch.cuda.is_available(),
           "cpu_count": os.cpu_count(), "card": card_slug()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    try:
        st = os.statvfs("/dev/shm")
        rec["dev_shm_gib"] = round(st.f_frsize * st.f_blocks / 2**30, 1)  # DataLoader workers' batches live here
    except OSError:
        rec["dev_shm_gib"] = None
    # torch.compile's Triton launcher is built with a C compiler against Python.h.
    rec["cc"] = shutil.which("gcc") or shutil.which("cc")
    rec["python_h"] = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    versions = {}
    for name in CARRIED + ("triton", "numpy", "pillow", "pytest", "hypothesis", "httpx", "onnx", "onnxscript",
                           "onnxruntime", "protobuf", "pytest-xdist"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    rec["packages"] = versions
    try:
        rec["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                            "power.limit,temperature.gpu,utilization.gpu", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rec["nvidia_smi"] = None
    emit(rec)
    return 0


def cmd_peak(args) -> int:
    """The two ceilings of this card, measured: a bf16 matrix product on random data and
    a device-to-device copy (bytes read plus written), median of `reps` timed runs with
    CUDA events after warm-ups."""
    import torch
    if not torch.cuda.is_available():
        emit({"name": "peak", "skipped": "no CUDA device"})
        return 0

    def median_ms(fn, reps):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    n = args.matrix
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, args.reps)
    nbytes = args.copy_gib * 2**30
    x = torch.rand(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), args.reps)
    emit({"name": "peak", "bf16_matmul_tflops": 2 * n**3 / ms / 1e9, "matmul_size": n,
          "copy_tb_per_s": 2 * nbytes / copy_ms / 1e9, "copy_gib": args.copy_gib, "reps": args.reps})
    return 0


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


def _dynamo_graphs():
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - torch without dynamo: no count
        return None
    return int(counters["stats"]["unique_graphs"])


def cmd_main(args) -> int:
    """main.py in this process: per epoch, the graphs torch.compile made (training and
    validation of that epoch); then peak GPU memory. Writes --json on rank 0."""
    import torch

    import engine.train.epoch
    import main as main_cli

    original = engine.train.epoch.train_one_epoch
    starts = []

    def counted(*a, **k):
        starts.append({"graphs_at_start": _dynamo_graphs(), "time": time.perf_counter()})
        return original(*a, **k)

    # main.py (or whatever module runs the epoch loop now) imported it by name.
    patched = [name for name, mod in list(sys.modules.items())
               if getattr(mod, "train_one_epoch", None) is original and mod is not engine.train.epoch]
    for name in patched:
        setattr(sys.modules[name], "train_one_epoch", counted)
    # Whether a process group was made, and with which backend: a one-process torchrun job
    # exercises NCCL only if the code joins a group at world size 1.
    import torch.distributed as dist
    groups, real_init = [], dist.init_process_group

    def recorded_init(*a, **k):
        groups.append(k.get("backend", a[0] if a else None))
        return real_init(*a, **k)
    dist.init_process_group = recorded_init
    start = time.perf_counter()
    rc = main_cli.main(main_cli.get_args_parser().parse_args(args.main_args))
    end_graphs, seconds = _dynamo_graphs(), time.perf_counter() - start
    epochs = []
    for n, s in enumerate(starts):
        nxt = starts[n + 1]["graphs_at_start"] if n + 1 < len(starts) else end_graphs
        epochs.append({"graphs_compiled": None if nxt is None or s["graphs_at_start"] is None else nxt - s["graphs_at_start"],
                       "seconds": round((starts[n + 1]["time"] if n + 1 < len(starts) else time.perf_counter()) - s["time"], 2)})
    out = {"main_rc": rc, "main_seconds": round(seconds, 2), "epochs_run": len(starts), "per_epoch": epochs,
           "graphs_total": end_graphs, "patched": patched, "process_group_backends": groups,
           "graphs_after_first_epoch": sum(e["graphs_compiled"] or 0 for e in epochs[1:]) if epochs else None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if int(os.environ.get("RANK", "0")) == 0 and args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f)
    return rc


def count_recompiles(log_text: str) -> list:
    """'Recompiling function' lines (TORCH_LOGS=recompiles) before each 'epoch N:' line of
    main.py's log, and after the last one."""
    counts, current = [], 0
    for line in log_text.splitlines():
        if "Recompiling function" in line:
            current += 1
        elif re.match(r"^epoch \d+:", line):
            counts.append(current)
            current = 0
    return counts + [current]


def cmd_recompiles(args) -> int:
    with open(args.log, encoding="utf-8", errors="replace") as f:
        counts = count_recompiles(f.read())
    emit({"name": args.name, "recompiles_per_epoch": counts[:-1], "recompiles_after_last_epoch": counts[-1],
          "recompiles_after_first_epoch": sum(counts[1:])})
    return 0


def cmd_check_run(args) -> int:
    """metrics.jsonl has every epoch with its fields; every checkpoint in the folder loads
    on the CPU and predicts distributions."""
    import torch
    from model import load_for_inference
    rec = {"name": args.name, "ckpt_dir": args.ckpt_dir}
    path = os.path.join(args.ckpt_dir, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rec["metrics_epochs"] = [r.get("epoch") for r in rows]
        rec["metrics_missing_keys"] = sorted({k for r in rows for k in METRICS_KEYS if k not in r})
        rec["metrics_complete"] = rec["metrics_epochs"] == list(range(1, args.epochs + 1)) and not rec["metrics_missing_keys"]
        rec["images_per_second"] = [r.get("images_per_second") for r in rows]
    except (OSError, ValueError) as exc:
        rec["metrics_complete"], rec["metrics_error"] = False, str(exc)
    loads = {}
    for name in sorted(os.listdir(args.ckpt_dir)) if os.path.isdir(args.ckpt_dir) else []:
        if not name.endswith(".pth"):
            continue
        try:
            model, model_args = load_for_inference(os.path.join(args.ckpt_dir, name), "cpu")
            size = model_args["image_size"]
            with torch.no_grad():
                out = model(torch.rand(2, 3, size, size))
            loads[name] = bool(torch.isfinite(out).all() and torch.allclose(out.sum(1), torch.ones(2), atol=1e-4))
        except Exception as exc:  # noqa: BLE001 - recorded, not raised: the step goes on
            loads[name] = f"{type(exc).__name__}: {exc}"[:300]
    rec["cpu_loads"] = loads
    rec["all_load_on_cpu"] = bool(loads) and all(v is True for v in loads.values())
    emit(rec)
    return 0


def _read_predictions(folder) -> dict:
    with open(os.path.join(folder, "predictions.csv"), newline="", encoding="utf-8") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def cmd_compare(args) -> int:
    """Largest differences between two predictions.csv files over the images both scored."""
    try:
        a, b = _read_predictions(args.a), _read_predictions(args.b)
    except OSError as exc:
        emit({"name": args.name, "error": str(exc)})
        return 0
    common = sorted(set(a) & set(b))
    dist_cols = [f"p{k}" for k in range(1, 11)]
    mean_diff = max((abs(float(a[i]["mean"]) - float(b[i]["mean"])) for i in common), default=math.nan)
    dist_diff = max((abs(float(a[i][c]) - float(b[i][c])) for i in common for c in dist_cols), default=math.nan)
    emit({"name": args.name, "images": len(common), "only_in_one": len(set(a) ^ set(b)),
          "max_abs_mean_diff": mean_diff, "max_abs_prob_diff": dist_diff,
          "within": {str(t): bool(dist_diff <= t) for t in (1e-5, 1e-4, 1e-3, 1e-2)}})
    return 0


def cmd_marginal(args) -> int:
    """Images/s of the work itself, without the process's start-up: from two records of
    the same command over a small and a large image set, (N_large - N_small) /
    (t_large - t_small)."""
    records = {}
    with open(os.environ["GPU_CHECK_JSONL"], encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            records[r.get("name")] = r
    small, big = records.get(args.small), records.get(args.big)
    rec = {"name": args.name, "small": args.small, "big": args.big}
    if small and big and small.get("rc") == 0 and big.get("rc") == 0 and big["seconds"] > small["seconds"]:
        rec["images_per_s"] = (big["images"] - small["images"]) / (big["seconds"] - small["seconds"])
        rec["startup_seconds"] = small["seconds"] - small["images"] / rec["images_per_s"]
    else:
        rec["error"] = "missing, failed or not slower: no marginal rate"
    emit(rec)
    return 0


# ----- profile -----

def cmd_profile(args) -> int:
    """torch.profiler over training steps of main.py's CUDA defaults, fed by the real
    loader from the resized cache (uint8 crops where the runtime supports them): the
    kernels and CPU ops that take the time, and the loader's wait per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.timing import TimedBatches
    from dataset import ImageDataset, train_transform
    from engine.loaders import make_loader
    from engine.runtime import Runtime, configure_backends, resolve_speed_flags, resolve_uint8_transfer
    from engine.train.epoch import EpochProgress, train_one_epoch
    from model import build_model, default_model_args

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_args = default_model_args(args.base_model)
    amp, cl = resolve_speed_flags("auto", "auto", device)
    uint8 = resolve_uint8_transfer("auto", device)
    rt = Runtime(device, amp, cl, show_progress=False, uint8_transfer=uint8).for_model(model_args)
    configure_backends(rt)
    cache = os.path.join(args.dir, f"cache{model_args['resize_size']}")
    paths = sorted(os.path.join(cache, p) for p in os.listdir(cache) if p.endswith(".jpg"))
    args.warmup = max(args.warmup, 1)  # the profiler starts after a step
    total = args.warmup + args.steps
    paths = (paths * (total * args.batch_size // max(len(paths), 1) + 1))[:total * args.batch_size]
    dataset = ImageDataset(paths, train_transform(model_args, uint8=uint8), torch.rand(len(paths), 10).softmax(1),
                           (3, model_args["image_size"], model_args["image_size"]))
    loader = make_loader(dataset, args.batch_size, args.workers, rt)
    model = build_model(model_args, pretrained="none").to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(1e-4, 1e-3), momentum=0.9, foreach=device.type == "cuda")
    timer = TimedBatches(loader, total, args.warmup, args.batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def on_step(progress):
        if progress.steps == args.warmup:  # after the warm-up steps: cuDNN autotuning, worker start-up
            prof.start()

    prof = profile(activities=activities, record_shapes=False)
    train_one_epoch(model, timer, optimizer, rt, 1, EpochProgress(), on_step=on_step, log=lambda *a, **k: None)
    result = timer.finish(device)
    prof.stop()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    with open(os.path.join(args.out, "profile_table.txt"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    emit({"name": "profile", "batch_size": args.batch_size, "uint8_loader": uint8, "amp": amp, "channels_last": cl,
          "workers": args.workers, **result})
    return 0


# ----- summary -----

def cmd_summary(args) -> int:
    """One line per record: what ran, its exit code and its key figures."""
    keys = ("not_run", "error", "rc", "seconds", "timed_out", "passed", "failed", "skipped", "images_per_s", "images_per_s_wall",
            "loader_wait_ms_per_step", "achieved_tflops", "bf16_matmul_tflops", "copy_tb_per_s", "peak_gpu_memory_gib",
            "graphs_after_first_epoch", "recompiles_after_first_epoch", "metrics_complete", "all_load_on_cpu",
            "max_abs_mean_diff", "max_abs_prob_diff", "batch_size", "p99_ms", "ratio_to_direct", "errors")
    with open(args.jsonl, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    peak = next((r["bf16_matmul_tflops"] for r in records if r.get("bf16_matmul_tflops")), None)
    for r in records:
        shown = []
        for k in keys:
            if k in r and r[k] is not None:
                v = r[k]
                shown.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        if peak and r.get("achieved_tflops"):
            shown.append(f"of_measured_bf16_peak={r['achieved_tflops'] / peak:.3f}")
        label = r.get("name", "?") + (f" [{r['variant']}/{r['data']}]" if "variant" in r else "")
        print(f"{r.get('step', '')}: {label}: {', '.join(shown)}")
        if r.get("failing"):
            print(f"    failing: {' '.join(r['failing'][:20])}")
    return 0


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
