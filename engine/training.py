"""One training epoch and one evaluation pass; the epoch loop lives in main.py."""
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from model.loss import emd_per_sample

from .distributed import all_reduce_sum, gather_objects
from .metrics import compute_metrics

LOG_EVERY_STEPS = 10


class NonFiniteLossError(RuntimeError):
    pass


class BadImageError(RuntimeError):
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
                "loss_count": self.loss_count, "skipped": list(self.skipped), "seconds": self.seconds}


def train_one_epoch(model, loader, optimizer, rt, epoch, progress: EpochProgress, *,
                    strict_images=False, paths=None, writer=None, global_step=0, on_step=None, log=print):
    """Train over `loader` (which already skips what `progress` has done); returns `progress`.

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
        images = rt.images_to_device(batch["image"])
        targets = batch["target"].to(rt.device, non_blocking=True)
        weights = ok.to(rt.device, non_blocking=True).float()
        torch.manual_seed(step_seed_base + progress.steps)
        with rt.autocast():
            pred = model(images)
        per_sample = emd_per_sample(pred, targets)  # float32, (B,)
        n_ok = int(ok.sum())
        # Unreadable samples weigh nothing; a batch of only those still steps (with zero
        # gradients) so that every DDP rank takes part in the all-reduce.
        loss = (per_sample * weights).sum() / max(n_ok, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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


@torch.no_grad()
def predict(model, loader, rt, desc="predict"):
    """Run the model over a loader; returns (indices, dists (N, 10) float64, errors) for
    this rank's items. Under TTA the images are (B, N, C, H, W) and the N predicted
    distributions of each image are averaged."""
    model.eval()
    indices, dists, errors = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not rt.progress, dynamic_ncols=True, leave=False):
        images = batch["image"]
        crops = images.shape[1] if images.dim() == 5 else 1
        if crops > 1:
            images = images.flatten(0, 1)
        with rt.autocast():
            out = model(rt.images_to_device(images))
        out = out.float().view(len(batch["index"]), crops, -1).mean(dim=1).cpu()
        for i, ok, err, row in zip(batch["index"].tolist(), batch["ok"].tolist(), batch["error"], out):
            if ok:
                indices.append(i)
                dists.append(row.double().numpy())
            else:
                errors.append((i, err))
    return indices, (np.stack(dists) if dists else np.zeros((0, 10))), errors


def gather_predictions(rt, indices, dists, errors):
    """All ranks' predictions, each item once, ordered by dataset index."""
    parts = gather_objects(rt.dist, (indices, dists, errors))
    indices = [i for p in parts for i in p[0]]
    dists = np.concatenate([p[1] for p in parts]) if indices else np.zeros((0, 10))
    errors = sorted(e for p in parts for e in p[2])
    order = np.argsort(indices, kind="stable")
    return [indices[k] for k in order], dists[order], errors


def evaluate(model, loader, rt, targets, desc="val"):
    """Metrics over the exact evaluation set (every readable image once, across ranks).

    targets: (N, 10) true distributions indexed like the dataset."""
    indices, dists, errors = gather_predictions(rt, *predict(model, loader, rt, desc=desc))
    if not indices:
        raise BadImageError(f"{desc}: no readable image to evaluate ({len(errors)} unreadable)")
    metrics = compute_metrics(dists, np.asarray(targets)[indices])
    return metrics, errors
