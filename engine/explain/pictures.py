"""The pictures of explanations and enhancements, drawn headless (Agg), written atomically:
- test.py --explain: explain/<image_id>.png for the best and worst scored images of a
  run, each the photo beside its heat map (heatmaps.py) with the predicted mean (and the
  true one when the CSV has labels); heat_overlay: that heat map alone, for the web page;
- tools/enhance.py: before/after with both predicted means, and a parameter sweep as one
  row of photos."""
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.images import ImageReadError, load_rgb

from engine.explain.heatmaps import explain_image
from engine.explain.pixels import crop_box, safe_name
from engine.plots import pyplot, save_figure

EXPLAIN_DIR = "explain"
FIGURE_INCHES = (8.0, 4.6)  # 800 x 460 px
THUMB_PIXELS = 480           # longest side drawn: plenty for a 4-inch panel, keeps the PNG small
HEAT_CMAP = "RdBu_r"         # red raises the predicted mean, blue lowers it
HEAT_ALPHA = 0.75            # the heat map's opacity where its magnitude is 1


def select_rows(rows, k):
    """The k highest and k lowest scored rows, best first then worst last (ties by id, as
    on the contact sheet); every row for k = 'all' or when 2k covers them all."""
    order = sorted(rows, key=lambda r: (-r["mean"], r["image_id"]))
    if k == "all" or 2 * k >= len(order):
        return order
    return order[:k] + order[-k:]


def plot_explanation(rgb, heat, path, title, subtitle="", box=None) -> None:
    """The photo (left) and, in grey, under its signed heat map (right; red raises the
    predicted mean, blue lowers it, colour bar in [-1, 1]), `title` above; `box` (x0, y0,
    x1, y1 in the image's pixels) is drawn dashed: the crop the model sees. 800 x 460 px."""
    plt = pyplot()
    scale = min(1.0, THUMB_PIXELS / max(rgb.size))
    size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
    photo = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR) if scale < 1 else rgb)
    heat_small = np.asarray(Image.fromarray(np.asarray(heat, np.float32), "F").resize(size, Image.Resampling.BILINEAR))
    fig, axes = plt.subplots(1, 2, figsize=FIGURE_INCHES)
    fig.subplots_adjust(left=0.02, right=0.9, bottom=0.03, top=0.84, wspace=0.04)
    axes[0].imshow(photo)
    axes[1].imshow(np.asarray(Image.fromarray(photo).convert("L")), cmap="gray", vmin=0, vmax=255)  # colours read truer on grey
    # Opacity follows the magnitude, so regions that do not matter show the photo as it is.
    shown = axes[1].imshow(heat_small, cmap=HEAT_CMAP, vmin=-1, vmax=1, alpha=np.clip(np.abs(heat_small), 0, 1) * HEAT_ALPHA)
    if box is not None:
        x0, y0, x1, y1 = (v * scale for v in box)
        for ax in axes:
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ls="--", lw=1, color="white"))
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(shown, cax=fig.add_axes([0.915, 0.1, 0.02, 0.68]), ticks=[-1, 0, 1])
    bar.ax.set_yticklabels(["lowers", "0", "raises"], fontsize=8)
    fig.suptitle(title, fontsize=13, y=0.97)
    fig.text(0.5, 0.87, subtitle, ha="center", fontsize=8)
    save_figure(fig, path)


def heat_overlay(rgb, heat) -> Image.Image:
    """The right-hand panel of plot_explanation as an RGB image of the photo's size (for
    the web page): the photo in grey under its signed heat map in HEAT_CMAP over [-1, 1],
    each pixel's opacity |heat| * HEAT_ALPHA, so regions that do not matter show the photo."""
    from matplotlib import colormaps  # the pictures' dependency, imported when drawn (as pyplot())

    h = np.clip(np.asarray(heat, np.float32), -1.0, 1.0)
    if h.shape != (rgb.size[1], rgb.size[0]):
        raise ValueError(f"heat map {h.shape[1]}x{h.shape[0]} for an image of {rgb.size[0]}x{rgb.size[1]}")
    grey = np.asarray(rgb.convert("L"), np.float32)[..., None] / 255.0
    colour = colormaps[HEAT_CMAP]((h + 1.0) / 2.0)[..., :3]  # imshow's vmin=-1, vmax=1
    alpha = (np.abs(h) * HEAT_ALPHA)[..., None]
    out = alpha * colour + (1.0 - alpha) * grey
    return Image.fromarray(np.round(out * 255.0).astype(np.uint8), "RGB")


def write_explanations(model, model_args, out_dir, rows, paths_by_id: dict, k, rt, max_pixels=None,
                       show_progress=True) -> list:
    """explain/<safe image id>.png in out_dir (safe_name: photo.jpg -> photo.png) for the
    rows (of predictions.csv: read_predictions) that select_rows picks (k: count or 'all');
    PNGs of an older run in explain/ are removed. The images are decoded as they were scored
    (rt.jpeg_draft), the maps computed on rt.device in float32 (heatmaps.py says why).
    An image that cannot be read again (changed since it was scored) is reported and
    skipped. Returns the paths written."""
    rows = select_rows(rows, k)
    folder = os.path.join(out_dir, EXPLAIN_DIR)
    os.makedirs(folder, exist_ok=True)
    written, taken = [], set()
    for row in tqdm(rows, desc="explain", disable=not show_progress, dynamic_ncols=True, leave=False):
        target = os.path.join(folder, safe_name(row["image_id"], taken) + ".png")
        try:
            rgb = load_rgb(paths_by_id[row["image_id"]], max_pixels, draft_side=model_args["resize_size"] if rt.jpeg_draft else None)
        except ImageReadError as exc:
            print(f"explain: {paths_by_id[row['image_id']]}: {exc}; no picture", file=sys.stderr)
            continue
        heat, dist, info = explain_image(model, model_args, rgb, rt.device)
        shown_id = row["image_id"] if len(row["image_id"]) <= 48 else "..." + row["image_id"][-45:]  # fits the width
        title = f"{shown_id}   predicted {row['mean']:.2f}" + (
            f"   true {row['gt_mean']:.2f}" if row["gt_mean"] is not None else "")
        subtitle = (f"{info['method']} on {info['layer']}: red raises, blue lowers the predicted mean; "
                    f"dashed: the centre crop the model scores")
        plot_explanation(rgb, heat, target, title, subtitle, crop_box(rgb.size, model_args))
        written.append(target)
    keep = {os.path.basename(p) for p in written}
    for name in os.listdir(folder):  # an output folder never mixes runs
        if name.endswith(".png") and name not in keep:
            os.remove(os.path.join(folder, name))
    return written


PANEL_INCHES = (4.0, 3.6)      # one photo of before_after.png: 800 x 360 px in all
SWEEP_TILE_INCHES = (2.0, 2.1)  # one photo of a sweep row


def thumbnail(img: Image.Image, pixels: int = THUMB_PIXELS) -> Image.Image:
    img = img.copy()
    img.thumbnail((pixels, pixels), Image.Resampling.LANCZOS)
    return img


def _settings(values: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in values.items())


def plot_before_after(before, after, score_before: float, score_after: float, values: dict, path,
                      note: str = "") -> None:
    """The photo and its enhancement side by side, each with its predicted mean; the
    settings (and `note`, e.g. that nothing was changed) underneath. 800 x 360 px."""
    fig, axes = pyplot().subplots(1, 2, figsize=(2 * PANEL_INCHES[0], PANEL_INCHES[1]))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.12, top=0.9, wspace=0.05)
    for ax, img, label in ((axes[0], before, f"before: {score_before:.2f}"), (axes[1], after, f"after: {score_after:.2f}")):
        ax.imshow(thumbnail(img))
        ax.set_title(label, fontsize=12)
        ax.set_axis_off()
    fig.text(0.5, 0.04, note or _settings(values), ha="center", fontsize=9)
    save_figure(fig, path)


def plot_sweep(images, values, scores, name: str, path, neutral: float) -> None:
    """One row: the photo at each value of `name` (the neutral one marked), with the
    predicted mean under each. (2 x steps) x 2.1 inches at the plots' DPI."""
    n = len(images)
    fig, axes = pyplot().subplots(1, n, figsize=(SWEEP_TILE_INCHES[0] * n, SWEEP_TILE_INCHES[1]), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.14, top=0.84, wspace=0.06)
    for ax, img, v, s in zip(axes[0], images, values, scores):
        ax.imshow(thumbnail(img, 300))
        ax.set_axis_off()
        ax.set_title(f"{name} {v:.2f}" + (" (as is)" if abs(v - neutral) < 1e-9 else ""), fontsize=9)
        ax.text(0.5, -0.04, f"mean {s:.2f}", transform=ax.transAxes, ha="center", va="top", fontsize=11)
    save_figure(fig, path)
