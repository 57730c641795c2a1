"""One training epoch; evaluation lives in inference.py, the epoch loop in main.py."""
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model.loss import emd_per_sample

from engine.distributed import all_reduce_sum
from engine.score.inference import BadImageError

LOG_EVERY_STEPS = 10


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class EpochProgress:
    """What an epoch has done so far; saved in mid-epoch checkpoints so a resumed
    epoch reports the same totals as an uninterrupted one."""
    steps: int = 0          # optimiser steps taken in this epoch (by this rank)
    samples: int = 0        # samples consumed by this rank, readable or not
    loss_sum: float = 0.0   # sum of per-sample EMD over readable samples
    loss_count: int = 0
    skipped: list = field(default_factory=list)  # paths of unreadable images
    warned: list = field(default_factory=list)   # paths of images used although their decoder warned
    seconds: float = 0.0
    pending_loss: object = None  # device tensor not yet added to loss_sum (avoids a sync per step)

    @classmethod
    def from_dict(cls, d):
        return cls(**d) if d else cls()

    def sync(self) -> "EpochProgress":
        if self.pending_loss is not None:
            self.loss_sum += float(self.pending_loss)
            self.pending_loss.zero_()
        return self

    def to_dict(self) -> dict:
        self.sync()
        return {"steps": self.steps, "samples": self.samples, "loss_sum": self.loss_sum,
                "loss_count": self.loss_count, "skipped": list(self.skipped), "warned": list(self.warned),
                "seconds": self.seconds}


def train_one_epoch(model, loader, optimizer, rt, epoch, progress: EpochProgress, *,
                    strict_images=False, paths=None, writer=None, global_step=0, on_step=None, log=print,
                    clip_grad_norm=0.0):
    """Train over `loader` (which already skips what `progress` has done); returns `progress`.

    clip_grad_norm: when > 0, the gradients (all parameters together) are scaled down to at
    most this norm before each step; on the device, without waiting for it.

    on_step(progress) runs after every optimiser step, for mid-epoch checkpoints and
    signal handling; it calls progress.to_dict() only when it saves."""
    model.train()
    progress.pending_loss = torch.zeros((), device=rt.device)  # accumulated on the device: no per-step sync
    # Dropout masks of step k come from (the caller's per-epoch seed, k), not from the RNG's
    # history, so a run resumed mid-epoch draws the same masks (loader workers and the
    # iterator's own draws would otherwise shift them).
    step_seed_base = int(torch.randint(0, 2**62, ()))
    start_time, start_seconds = time.time(), progress.seconds
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not rt.progress, dynamic_ncols=True, leave=False)
    for batch in bar:
        ok = batch["ok"]
        if not ok.all():
            bad = [paths[i] if paths else str(i) for i in batch["index"][~ok].tolist()]
            reasons = [e for e in batch["error"] if e]
            if strict_images:
                raise BadImageError(f"unreadable training image {bad[0]}: {reasons[0]} (--strict_images is set)")
            for path, reason in zip(bad, reasons):
                log(f"skipping unreadable image {path}: {reason}")
            progress.skipped.extend(bad)
        # Decoder warnings are counted, not printed: a messy folder would flood the log.
        progress.warned.extend(paths[i] if paths else str(i)
                               for i, w in zip(batch["index"].tolist(), batch.get("warning", ())) if w)
        images = rt.images_to_device(batch["image"])
        targets = batch["target"].to(rt.device, non_blocking=True)
        weights = ok.to(rt.device, non_blocking=True).float()
        torch.manual_seed(step_seed_base + progress.steps)
        with rt.autocast():
            pred = model(images)
        per_sample = emd_per_sample(pred, targets)  # float32, (B,)
        n_ok = int(ok.sum())  # `ok` is a CPU tensor: no device sync
        # Unreadable samples weigh nothing. A batch of only those still runs backward (zero
        # gradients), so that every DDP rank takes part in the all-reduce, but in a single
        # process it takes no optimiser step: with momentum, a step on zero gradients would
        # still move the weights. Under DDP every rank steps, as the replicas must stay equal
        # (their averaged gradient holds the other ranks' readable samples).
        loss = (per_sample * weights).sum() / max(n_ok, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if n_ok > 0 or rt.dist.enabled:
            optimizer.step()
        progress.pending_loss += (per_sample.detach() * weights).sum()
        progress.steps += 1
        progress.samples += len(ok)
        progress.loss_count += n_ok
        if progress.steps % LOG_EVERY_STEPS == 0 or progress.steps == 1:
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"loss became {value} at epoch {epoch}, step {progress.steps}")
            elapsed = time.time() - start_time
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{progress.samples / max(elapsed + start_seconds, 1e-9):.1f}")
            if writer is not None:
                writer.add_scalar("train/batch_loss", value, global_step + progress.steps)
        progress.seconds = start_seconds + time.time() - start_time
        if on_step is not None:
            on_step(progress)
    progress.sync()
    progress.seconds = start_seconds + time.time() - start_time
    if not math.isfinite(progress.loss_sum):
        raise NonFiniteLossError(f"loss became non-finite during epoch {epoch}")
    return progress


def epoch_train_loss(rt, progress: EpochProgress) -> float:
    """Mean per-sample training EMD over all ranks' readable samples."""
    loss_sum, count = all_reduce_sum(rt.dist, [progress.loss_sum, progress.loss_count])
    return loss_sum / max(count, 1)
