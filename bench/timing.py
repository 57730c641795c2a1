"""Timing helpers for the benchmark: device synchronisation, and a batch iterable that
records how long the training loop waited for each batch (loader wait)."""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import time

import torch


def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; CPU needs nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result, seconds) of fn(), with the device's queued work finished on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


class TimedBatches:
    """Hands out `total` batches from `source` (an iterable: a DataLoader, or the same
    synthetic batch repeated) and records when each was asked for and when it arrived.

    The first `warmup` batches are not timed (cuDNN autotuning, torch.compile, worker
    start-up): the clock starts when batch `warmup` is asked for, and stops at
    `finish()`, called once the loop is done and the device synchronised."""

    def __init__(self, source, total: int, warmup: int, batch_size: int):
        if total <= warmup:
            raise ValueError(f"need more batches ({total}) than warm-up batches ({warmup})")
        self.source, self.total, self.warmup, self.batch_size = source, total, warmup, batch_size
        self.asked, self.arrived = [], []
        self.end = None

    def __len__(self):
        return self.total

    def __iter__(self):
        it = iter(self.source)
        for _ in range(self.total):
            self.asked.append(time.perf_counter())
            try:
                batch = next(it)
            except StopIteration:
                return
            self.arrived.append(time.perf_counter())
            yield batch

    def finish(self, device) -> dict:
        sync(device)
        self.end = time.perf_counter()
        steps = len(self.arrived) - self.warmup
        if steps < 1:
            raise RuntimeError(f"the source ran out after {len(self.arrived)} batches (warm-up {self.warmup})")
        seconds = self.end - self.asked[self.warmup]
        waits = [a - b for a, b in zip(self.arrived[self.warmup:], self.asked[self.warmup:])]
        return {"images_per_s": steps * self.batch_size / seconds, "steps": steps, "seconds": seconds,
                "loader_wait_ms_per_step": 1000.0 * sum(waits) / steps}


def repeat(item, times: int):
    """The same synthetic batch, `times` times (no copies)."""
    for _ in range(times):
        yield item


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none), for the
    benchmarks' hardware lines."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""
