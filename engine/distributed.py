"""Distributed mode from torchrun's environment; a plain run never touches torch.distributed."""
import datetime
import os
import shlex
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.flags import FALSE_WORDS, TRUE_WORDS


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_request: str, timeout_s: int = 600) -> tuple:
    """Return (DistInfo, torch.device). Under torchrun (WORLD_SIZE > 1) join the process
    group: NCCL on GPUs, gloo on CPU, with a timeout so a rank that hangs (rather than
    dies: torchrun already tears the job down when a worker exits) ends the job after
    `timeout_s` seconds in a collective instead of blocking it forever."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))
    device = pick_device(device_request, info.local_rank)
    if info.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        warning = restart_store_warning(os.environ)
        if warning and info.is_main:  # before init: that is where a restart fails
            print(f"warning: {warning}", file=sys.stderr)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info, device


def restart_store_warning(environ) -> str:
    """Why restarts may fail, or '' when they are safe. With --max_restarts, torchrun by
    default shares its rendezvous store with the workers, and the process-group keys of
    the workers that died stay in it: a restarted rank can read a dead rank's address and
    fail to connect ("Connection refused" in init_process_group; pytorch/pytorch#135712,
    #167288). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every restart a fresh store."""
    if int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun --max_restarts with its shared rendezvous store: a restart can fail with "
                "'Connection refused' (stale addresses of the dead workers); launch torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment")
    return ""


def pick_device(request: str, local_rank: int = 0) -> torch.device:
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {request}: CUDA is not available here; use --device cpu")
        return torch.device(request if ":" in request else f"cuda:{local_rank}")
    if request != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {request!r}")
    return torch.device("cpu")


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(script: str, argv: list, nproc: int, gpu_ids=None) -> str:
    """The command that replaces a reference-style `--multi_gpu [--gpu_ids ...]` run:
    torchrun with one process per GPU, `argv` without those two flags (and their values),
    the chosen GPUs as CUDA_VISIBLE_DEVICES."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--multi_gpu":
            if i < len(argv) and argv[i].lower() in TRUE_WORDS + FALSE_WORDS:
                i += 1
        elif arg == "--gpu_ids":
            while i < len(argv) and argv[i].isdigit():
                i += 1
        elif not arg.startswith(("--multi_gpu=", "--gpu_ids=")):
            kept.append(arg)
    env = f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpu_ids))} " if gpu_ids else ""
    return f"{env}torchrun --standalone --nproc_per_node={nproc} {shlex.join([script, *kept])}"


def broadcast_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, which each rank updates on its
    own batches) to every rank, so all ranks evaluate the very model rank 0 saves."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(info: DistInfo, obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a plain run)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_union(info: DistInfo, items: list) -> list:
    """Every rank's items, each once, sorted. A set, since after a mid-epoch resume every
    rank starts from rank 0's saved list (an image occurs once per epoch)."""
    return sorted({x for part in gather_objects(info, items) for x in part})


def all_reduce_sum(info: DistInfo, values: list) -> list:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()
