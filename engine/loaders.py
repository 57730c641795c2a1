"""The one DataLoader factory: training, validation and scoring loaders are all built here,
so pinned memory, worker settings and signal handling are the same everywhere."""
import os
import signal

import torch


def make_loader(dataset, batch_size, workers, rt, sampler=None, shuffle=False, drop_last=False, generator=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
        pin_memory=rt.device.type == "cuda", drop_last=drop_last, generator=generator,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_sigint)


def ignore_sigint(_worker_id):
    """Ctrl-C reaches the whole process group: let the main process handle it alone
    (it saves a checkpoint), instead of every loader worker dying at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_batch_size(device: torch.device) -> int:
    """Network inputs per forward pass when none is given. On a CPU the speed hardly
    changes past a few images while the memory grows with the batch: VGG16 at 224 peaked
    at 0.69, 0.85 and 1.13 GB for batches of 4, 8 and 16 (test.py on 32 photos, whole
    process tree, the 2-core machine), against 0.92 GB for a one-image-at-a-time loop."""
    return 64 if device.type == "cuda" else 8


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset),
    which can be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_workers(device: torch.device, num_items: int, batch_size: int) -> int:
    """DataLoader workers when none are given. None for a job of one batch: starting a
    worker costs more than decoding a few images. On a CPU the network, not the decoding,
    is the bottleneck (VGG16: about 5 images/s on 2 cores; Pillow decodes about 200 per
    core), so workers would only compete with torch's threads for the cores: 1 worker up
    to 4 cores, a quarter of the cores above (2 cores: 1; 16 cores: 4). On CUDA the
    decoding is the bottleneck: up to 8."""
    if num_items <= batch_size:
        return 0
    cores = available_cores()
    if device.type == "cuda":
        return min(8, cores)
    return 1 if cores <= 4 else min(8, cores // 4)
