"""The pictures of tools/enhance.py: before/after with both predicted means, and a
parameter sweep as one row of photos. Drawn headless (Agg), written atomically."""
from PIL import Image

from .explain_pictures import pyplot
from .plots import save_figure

PANEL_INCHES = (4.0, 3.6)      # one photo of before_after.png: 800 x 360 px in all
SWEEP_TILE_INCHES = (2.0, 2.1)  # one photo of a sweep row
THUMB_PIXELS = 480


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
