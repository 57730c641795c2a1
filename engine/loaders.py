"""The one DataLoader factory: training, validation and scoring loaders are all built here,
so pinned memory, worker settings and signal handling are the same everywhere."""
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
