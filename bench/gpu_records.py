"""The GPU check's records (bench/GPU.md): append one to $GPU_CHECK_JSONL, and the
checks that read what a step left behind (recompilations in a log, a training run's
outputs, two prediction files side by side, a marginal rate from two runs) and the
summary. bench/gpu_steps.py runs them as its subcommands."""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import csv
import json
import math
import os
import re

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
