"""Scoring a list of images with a trained model, and writing the prediction files
(design.md 3.5) atomically."""
import csv
import io
import os
import re
import signal
from dataclasses import dataclass

import numpy as np
import torch

from dataset import ImageDataset, ShardSampler, TTACrops, eval_transform

from .fileio import atomic_write_json, atomic_write_text, write_or_remove
from .metrics import compute_metrics, mean_and_std
from .training import gather_predictions, predict


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


def inference_transform(model_args, tta=1):
    """PIL RGB image -> (3, H, W) centre crop, or (tta, 3, H, W) fixed crops under TTA."""
    return eval_transform(model_args) if tta == 1 else TTACrops(model_args, tta)


def inference_dataset(paths, model_args, dists=None, tta=1):
    transform = inference_transform(model_args, tta)
    size = model_args["image_size"]
    shape = (3, size, size) if tta == 1 else (tta, 3, size, size)
    return ImageDataset(paths, transform, dists, image_shape=shape)


def images_per_batch(batch_size, tta=1):
    """--batch_size counts network inputs: under TTA each image is `tta` crops, and 64
    images x 10 crops in one VGG16 forward pass need over 20 GB on CPU (measured: the
    process was killed for memory)."""
    return max(1, batch_size // tta)


def score_images(model, model_args, paths, rt, batch_size=64, workers=2, tta=1):
    """Predicted distributions for `paths`: (indices of readable images, (N, 10) dists,
    [(index, reason)] for the rest). Every item once, across ranks."""
    dataset = inference_dataset(paths, model_args, tta=tta)
    sampler = ShardSampler(len(dataset), rt.dist.world_size, rt.dist.rank)
    loader = make_loader(dataset, images_per_batch(batch_size, tta), workers, rt, sampler=sampler)
    return gather_predictions(rt, *predict(model, loader, rt, desc="score"))


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def write_predictions(out_dir, ids, pred_dists, true_dists=None, errors=()) -> dict:
    """Write predictions.csv, pred.txt, metrics.json (with labels) and errors.csv (when some
    inputs failed) into `out_dir`, replacing a previous run's files. Returns the metrics
    ({} without labels)."""
    os.makedirs(out_dir, exist_ok=True)
    pred_mean, pred_std = mean_and_std(pred_dists)
    has_gt = true_dists is not None and len(ids) > 0
    if has_gt:
        gt_mean, gt_std = mean_and_std(true_dists)
    table, lines = io.StringIO(), []
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["image_id", "mean", "std"] + [f"p{k}" for k in range(1, 11)] + (["gt_mean", "gt_std"] if has_gt else []))
    for n, image_id in enumerate(ids):
        row = [image_id, _fmt(pred_mean[n]), _fmt(pred_std[n])] + [_fmt(p) for p in pred_dists[n]]
        line = f"{image_id} mean: {pred_mean[n]:.3f} | std: {pred_std[n]:.3f}"
        if has_gt:
            row += [_fmt(gt_mean[n]), _fmt(gt_std[n])]
            line += f" | GT: {gt_mean[n]:.3f}"
        writer.writerow(row)
        lines.append(line)
    atomic_write_text(os.path.join(out_dir, "predictions.csv"), table.getvalue())
    atomic_write_text(os.path.join(out_dir, "pred.txt"), "".join(l + "\n" for l in lines))
    metrics = compute_metrics(pred_dists, true_dists) if has_gt else {}
    write_or_remove(os.path.join(out_dir, "metrics.json"), bool(metrics), lambda p: atomic_write_json(p, metrics))
    err = io.StringIO()
    csv.writer(err, lineterminator="\n").writerows([("path", "reason"), *errors])
    write_or_remove(os.path.join(out_dir, "errors.csv"), len(errors) > 0, lambda p: atomic_write_text(p, err.getvalue()))
    return metrics


# `<id> mean: 5.962 | std: 1.420 | GT: 5.914`; the id may hold spaces, `| GT` is optional.
_PRED_LINE = re.compile(r"(?P<id>.+?) mean: (?P<mean>\S+) \| std: (?P<std>\S+)(?: \| GT: (?P<gt>\S+))?")


@dataclass
class PredTxt:
    ids: list
    mean: np.ndarray             # (N,) predicted mean scores
    std: np.ndarray              # (N,) predicted standard deviations
    gt_mean: np.ndarray = None   # (N,) true mean scores, or None when the file has no `| GT` part


def read_pred_txt(path) -> PredTxt:
    """Read a pred.txt (ours or the reference's published one). Raises ValueError naming
    the first bad line; blank lines are ignored."""
    ids, values, has_gt = [], [], None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            m = _PRED_LINE.fullmatch(line)
            try:
                row = [float(m["mean"]), float(m["std"])] + ([float(m["gt"])] if m and m["gt"] else [])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line_no}: expected '<id> mean: M | std: S' with an optional "
                                 f"' | GT: G' and numbers for M, S, G; got {line[:120]!r}") from None
            if has_gt is None:
                has_gt = len(row) == 3
            elif has_gt != (len(row) == 3):
                raise ValueError(f"{path}:{line_no}: {'no' if has_gt else 'a'} '| GT' part, unlike the lines before it")
            ids.append(m["id"])
            values.append(row)
    table = np.asarray(values, dtype=np.float64).reshape(len(values), 3 if has_gt else 2)
    return PredTxt(ids, table[:, 0], table[:, 1], table[:, 2] if has_gt else None)



def run_on_table(model, model_args, table, rt, out_dir, batch_size, workers, tta=1, ids=None):
    """Score every image of a label table (or id list) and write the prediction files.
    Returns (metrics, errors, kept indices, predicted dists)."""
    indices, dists, failures = score_images(model, model_args, table.paths, rt, batch_size, workers, tta)
    ids = ids if ids is not None else table.ids
    errors = [(table.paths[i], reason) for i, reason in failures]
    metrics = {}
    if rt.dist.is_main:
        true = None if table.dists is None else np.asarray(table.dists)[indices]
        metrics = write_predictions(out_dir, [ids[i] for i in indices], dists, true, errors)
    return metrics, errors, indices, dists
