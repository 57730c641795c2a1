"""The prediction files of a scoring run: predictions.csv, pred.txt, metrics.json,
errors.csv and warnings.csv (README, "Output files"), written atomically."""
import csv
import io
import os
import sys

from dataset.mos import from_bins
from fileio import atomic_write_json, atomic_write_text, write_or_remove
from model.card import percentiles

from engine.metrics import compute_metrics, format_table, mean_and_std, score_metrics


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def scaled_metrics(pred_mean, true_mean, score_range) -> dict:
    """The paper's score metrics on a MOS data set's own scale LO..HI (the means mapped
    back from the bins 1..10); correlations are unchanged by the linear map, errors are
    in the data set's units. The accuracy is left out: its threshold (5) is the bins'."""
    m = score_metrics(from_bins(pred_mean, score_range), from_bins(true_mean, score_range))
    return {"score_range": [float(x) for x in score_range], **{k: m[k] for k in ("srcc_mean", "plcc_mean", "mae_mean", "rmse_mean")}}


def write_predictions(out_dir, ids, pred_dists, true_dists=None, errors=(), warned=(), model_args=None,
                      score_range=None, card=None) -> dict:
    """Write predictions.csv, pred.txt, metrics.json (with labels), errors.csv (when some
    inputs failed) and warnings.csv (path, warning: scored images whose decoder warned)
    into `out_dir`, replacing a previous run's files. Returns the metrics ({} without labels).
    model_args: recorded in metrics.json (key `model_args`), so the preprocessing a score
    was made with (normalize, sizes) stays with it. score_range (LO, HI) of a MOS data set:
    predictions.csv gets `mean_scaled` (and `gt_mean_scaled`) on that scale, and metrics
    `scaled` (scaled_metrics). card: the model's card (model/card.py), embedded in
    metrics.json; with its percentiles, predictions.csv's `percentile` column is filled
    in (left empty without)."""
    os.makedirs(out_dir, exist_ok=True)
    pred_mean, pred_std = mean_and_std(pred_dists)
    quantiles = ((card or {}).get("percentiles") or {}).get("quantiles")
    pct = [f"{p:.2f}" for p in percentiles(pred_mean, quantiles)] if quantiles and len(ids) else [""] * len(ids)
    has_gt = true_dists is not None and len(ids) > 0
    if has_gt:
        gt_mean, gt_std = mean_and_std(true_dists)
    table, lines = io.StringIO(), []
    writer = csv.writer(table, lineterminator="\n")
    scaled = score_range is not None
    writer.writerow(["image_id", "mean"] + (["mean_scaled"] if scaled else []) + ["std"] + [f"p{k}" for k in range(1, 11)]
                    + (["gt_mean"] + (["gt_mean_scaled"] if scaled else []) + ["gt_std"] if has_gt else []) + ["percentile"])
    for n, image_id in enumerate(ids):
        row = [image_id, _fmt(pred_mean[n])] + ([_fmt(from_bins(pred_mean[n], score_range))] if scaled else [])
        row += [_fmt(pred_std[n])] + [_fmt(p) for p in pred_dists[n]]
        line = f"{image_id} mean: {pred_mean[n]:.3f} | std: {pred_std[n]:.3f}"
        if has_gt:
            row += [_fmt(gt_mean[n])] + ([_fmt(from_bins(gt_mean[n], score_range))] if scaled else []) + [_fmt(gt_std[n])]
            line += f" | GT: {gt_mean[n]:.3f}"
        writer.writerow(row + [pct[n]])  # last: the columns before it keep their places
        lines.append(line)
    atomic_write_text(os.path.join(out_dir, "predictions.csv"), table.getvalue())
    atomic_write_text(os.path.join(out_dir, "pred.txt"), "".join(l + "\n" for l in lines))
    metrics = compute_metrics(pred_dists, true_dists) if has_gt else {}
    if metrics and scaled:
        metrics["scaled"] = scaled_metrics(pred_mean, gt_mean, score_range)
    record = dict(metrics, **({"model_args": dict(model_args)} if model_args else {}), **({"card": card} if card else {}))
    write_or_remove(os.path.join(out_dir, "metrics.json"), bool(metrics), lambda p: atomic_write_json(p, record))
    err = io.StringIO()
    csv.writer(err, lineterminator="\n").writerows([("path", "reason"), *errors])
    write_or_remove(os.path.join(out_dir, "errors.csv"), len(errors) > 0, lambda p: atomic_write_text(p, err.getvalue()))
    warn = io.StringIO()
    csv.writer(warn, lineterminator="\n").writerows([("path", "warning"), *warned])
    write_or_remove(os.path.join(out_dir, "warnings.csv"), len(warned) > 0, lambda p: atomic_write_text(p, warn.getvalue()))
    return metrics


def read_predictions(path) -> list:
    """predictions.csv rows as {'image_id', 'mean', 'gt_mean' (None without labels)}."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{"image_id": r["image_id"], "mean": float(r["mean"]),
                 "gt_mean": float(r["gt_mean"]) if r.get("gt_mean") else None} for r in csv.DictReader(f)]


def print_report(out_dir, scored, total, metrics, errors, warned, pictures, title=None, written=("pred.txt",)) -> None:
    """What a scoring run wrote and found, on the terminal: the files, the paper's table
    (with labels), the counts of warnings and unreadable images (the first 10 named)."""
    print((f"{title}: " if title else "") + f"scored {scored} of {total} images -> "
          f"{os.path.join(out_dir, 'predictions.csv')}" + "".join(f", {name}" for name in written)
          + "".join(f", {os.path.basename(p)}" for p in pictures))
    if metrics:
        print(format_table(metrics))
    if "scaled" in metrics:
        s = metrics["scaled"]
        print(f"on the data set's scale {s['score_range'][0]:g}..{s['score_range'][1]:g} (predicted mean mapped back): "
              f"SRCC {s['srcc_mean']:.4f}  LCC {s['plcc_mean']:.4f}  MAE {s['mae_mean']:.4f}  RMSE {s['rmse_mean']:.4f}")
    if warned:  # scored all the same; the text of each is in the file, not on the terminal
        print(f"{len(warned)} image{'s' if len(warned) != 1 else ''} produced decoder warnings; see {os.path.join(out_dir, 'warnings.csv')}",
              file=sys.stderr)
    if errors:
        print(f"{len(errors)} image{'s' if len(errors) != 1 else ''} could not be read; see {os.path.join(out_dir, 'errors.csv')}", file=sys.stderr)
        for path, reason in errors[:10]:
            print(f"  {path}: {reason}", file=sys.stderr)
