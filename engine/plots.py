"""Pictures: training curves, a contact sheet of the best and worst scored images, and
predicted vs true scores. matplotlib runs headless (Agg). Every figure is drawn at a
fixed size and DPI (no bbox_inches='tight'), so the PNG's pixel size is known in
advance: see each function's docstring."""
import math
import os

import numpy as np

from dataset.images import ImageReadError, load_rgb  # the same decoding as scoring: EXIF, every mode
from fileio import atomic_path, write_or_remove

from engine.metrics import plcc, srcc

DPI = 100
SHEET_COLUMNS = 6          # at most this many tiles per row of the contact sheet
TILE_INCHES = (2.0, 2.4)   # width, height of one tile (image, id above, score below)
SCATTER_INCHES = (5.0, 5.0)


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, imported on first use: 0.5 s of
    start-up that a run drawing no picture (scoring a folder) does not pay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> None:
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive otherwise


def plot_curves(history: list, path, monitor: str = "val_emd", best_epoch=None) -> None:
    """Train/val EMD, the monitored metric (validation SRCC when the monitor is the EMD
    itself) and the learning rates per epoch, from metrics.jsonl records, with the best
    epoch marked on every panel. Size: 1500 x 380 px (3 panels of 500 x 380)."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    second = monitor if monitor != "val_emd" else "val_srcc_mean"
    panels = [("EMD (r=2)" + (" (monitored)" if monitor == "val_emd" else ""), [("train_loss", "train"), ("val_emd", "validation")]),
              (second + (" (monitored)" if second == monitor else ""), [(second, second)])]
    lr_keys = sorted(k for k in history[-1] if k.startswith("lr_"))
    panels.append(("learning rate", [(k, k[3:]) for k in lr_keys]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            ax.plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:green", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        if title == "learning rate" and all(r.get(k, 0) > 0 for r in history for k, _ in series):
            ax.set_yscale("log")  # decayed rates span decades; a zero rate cannot be drawn on a log axis
    fig.tight_layout()
    save_figure(fig, path)


def contact_sheet_layout(k: int, n: int) -> tuple:
    """(tiles per group, columns, rows per group) of a sheet of the k highest and k
    lowest of n scored images. With fewer than 2k images, the upper half of the ranking
    is 'highest' and the rest 'lowest', so no image appears twice."""
    per_group = min(k, math.ceil(n / 2))
    cols = min(per_group, SHEET_COLUMNS)
    return per_group, cols, math.ceil(per_group / cols)


def contact_sheet_pixels(k: int, n: int) -> tuple:
    """(width, height) in pixels of the PNG that plot_contact_sheet writes."""
    _, cols, rows = contact_sheet_layout(k, n)
    return round(cols * TILE_INCHES[0] * DPI), round(2 * rows * TILE_INCHES[1] * DPI)


def plot_contact_sheet(paths, ids, pred_mean, path, k: int, gt_mean=None, max_pixels=None) -> None:
    """A grid of the k highest scored images (upper rows) and the k lowest (lower rows),
    each with "predicted mean (ground truth)" under it, or the mean alone without labels.
    Ties are ranked by id, so the sheet is deterministic. Size: contact_sheet_pixels.
    An image that cannot be read again (changed since it was scored) gets a tile that
    says so. max_pixels: --max_image_pixels."""
    pred_mean = np.asarray(pred_mean, dtype=np.float64)
    if k < 1 or len(pred_mean) == 0:
        raise ValueError(f"a contact sheet needs k >= 1 and at least one scored image, got k={k}, {len(pred_mean)} images")
    order = sorted(range(len(pred_mean)), key=lambda i: (-pred_mean[i], ids[i]))
    per_group, cols, rows = contact_sheet_layout(k, len(order))
    groups = [("highest", order[:per_group]), ("lowest", order[per_group:][-per_group:][::-1])]
    plt = pyplot()
    fig = plt.figure(figsize=(cols * TILE_INCHES[0], 2 * rows * TILE_INCHES[1]))
    # What the number under each tile is, on the picture itself.
    fig.suptitle("predicted mean score (true mean)" if gt_mean is not None else "predicted mean score", fontsize=9,
                 y=1 - 0.02 / (2 * rows))
    # Fixed margins: room for the id above and the score below each tile.
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.09 / (2 * rows), top=1 - 0.09 / (2 * rows), wspace=0.06, hspace=0.3)
    grid = fig.add_gridspec(2 * rows, cols)
    for g, (name, members) in enumerate(groups):
        for slot in range(rows * cols):
            ax = fig.add_subplot(grid[g * rows + slot // cols, slot % cols])
            ax.set_axis_off()
            if slot >= len(members):
                continue
            i = members[slot]
            try:
                img = load_rgb(paths[i], max_pixels)
                img.thumbnail((4 * DPI, 4 * DPI))  # plenty for a 2-inch tile; keeps the PNG small
                ax.imshow(np.asarray(img))
            except ImageReadError as exc:
                ax.text(0.5, 0.5, f"unreadable:\n{_short(str(exc))}", transform=ax.transAxes, ha="center",
                        va="center", fontsize=7, wrap=True)
            label = f"{pred_mean[i]:.2f}" + (f" ({gt_mean[i]:.2f})" if gt_mean is not None else "")
            ax.text(0.5, -0.03, label, transform=ax.transAxes, ha="center", va="top", fontsize=11)
            ax.set_title(f"{name} #{slot + 1}: {_short(ids[i])}", fontsize=7)
    save_figure(fig, path)


def plot_scatter(pred_mean, gt_mean, path) -> None:
    """Predicted vs true mean score, with SRCC, LCC and n in the title. Size: 500 x 500 px."""
    pred_mean, gt_mean = np.asarray(pred_mean, np.float64), np.asarray(gt_mean, np.float64)
    fig, ax = pyplot().subplots(figsize=SCATTER_INCHES)
    ax.scatter(gt_mean, pred_mean, s=6 if len(pred_mean) > 2000 else 14, alpha=0.4 if len(pred_mean) > 2000 else 0.8,
               edgecolors="none")
    lo = min(gt_mean.min(), pred_mean.min(), 5.0) - 0.2
    hi = max(gt_mean.max(), pred_mean.max(), 5.0) + 0.2
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="predicted = true")
    ax.axhline(5.0, color="grey", lw=0.6, ls=":")
    ax.axvline(5.0, color="grey", lw=0.6, ls=":")  # the paper's high/low quality threshold
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("true mean score")
    ax.set_ylabel("predicted mean score")
    ax.set_title(f"SRCC {srcc(pred_mean, gt_mean):.3f}   LCC {plcc(pred_mean, gt_mean):.3f}   (n = {len(pred_mean)})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.96, bottom=0.11, top=0.92)
    save_figure(fig, path)


def write_result_pictures(out_dir, paths, ids, pred_mean, gt_mean=None, contact_sheet: int = 0, max_pixels=None) -> list:
    """scatter.png (with labels) and contact_sheet.png (when contact_sheet > 0) in out_dir;
    a picture this run does not make is removed, so none is left from an older run.
    Returns the paths written."""
    scatter, sheet = os.path.join(out_dir, "scatter.png"), os.path.join(out_dir, "contact_sheet.png")
    has_images = len(pred_mean) > 0
    written = []
    if write_or_remove(scatter, gt_mean is not None and has_images, lambda p: plot_scatter(pred_mean, gt_mean, p)):
        written.append(scatter)
    if write_or_remove(sheet, contact_sheet > 0 and has_images,
                       lambda p: plot_contact_sheet(paths, ids, pred_mean, p, contact_sheet, gt_mean, max_pixels)):
        written.append(sheet)
    return written


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
