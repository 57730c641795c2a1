"""The GPU check's training measurements (bench/GPU.md): main.py run in-process with the
graphs torch.compile made per epoch, the process group it joined and the peak GPU memory;
and torch.profiler over training steps fed by the real loader."""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import json
import os
import sys
import time

from bench.gpu_records import emit


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
