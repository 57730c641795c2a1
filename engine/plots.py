"""Pictures: training curves (more in later work). matplotlib runs headless (Agg)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_path  # noqa: E402


def save_figure(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curves(history: list, path, monitor: str = "val_emd") -> None:
    """Train/val EMD, the monitored metric and the learning rates per epoch, from
    metrics.jsonl records."""
    epochs = [r["epoch"] for r in history]
    panels = [("EMD (r=2)", [("train_loss", "train"), ("val_emd", "validation")])]
    if monitor != "val_emd":
        panels.append((monitor, [(monitor, monitor)]))
    lr_keys = sorted(k for k in history[-1] if k.startswith("lr_"))
    panels.append(("learning rate", [(k, k[3:]) for k in lr_keys]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            ax.plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        if title == "learning rate":
            ax.set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path)
