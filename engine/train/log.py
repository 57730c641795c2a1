"""What a training run writes as it goes, besides checkpoints (engine/train/checkpoints.py):
the per-epoch metrics log, TensorBoard scalars and curves.png. Only rank 0 writes."""
import json
import math
import os

from fileio import OutputWriteError, atomic_write_text

from engine.train.checkpoints import signed
from engine.plots import plot_curves


class MetricsLog:
    """metrics.jsonl: one JSON line per completed epoch. On (re)start it is rewritten to
    hold exactly the epochs the checkpoint has completed, so a crash between the line
    and the checkpoint never leaves a duplicated or missing epoch."""

    def __init__(self, path, keep_through_epoch: int):
        self.path = path
        self.records = []
        if keep_through_epoch > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    if record.get("epoch", math.inf) <= keep_through_epoch:
                        self.records.append(record)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        """Append one line; on a failed write (a full disk) the file is cut back to its
        previous lines, so it never holds a partial one."""
        line = json.dumps(record) + "\n"
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            try:
                os.truncate(self.path, size)
            except OSError:
                pass  # the next restart drops an unparsable last line anyway
            raise OutputWriteError(f"could not write {self.path}: {exc.strerror or exc} "
                                   f"(its earlier lines are intact)") from exc
        self.records.append(record)


class RunLog:
    """metrics.jsonl, TensorBoard scalars and curves.png of one run."""

    def __init__(self, ckpt_dir, log_dir, pictures_dir, monitor: str, completed_epochs: int):
        from tensorboardX import SummaryWriter  # imported here: only rank 0 of a training run needs it
        self.monitor = monitor
        self.curves_path = os.path.join(pictures_dir, "curves.png")
        self.metrics_log = MetricsLog(os.path.join(ckpt_dir, "metrics.jsonl"), completed_epochs)
        self.writer = SummaryWriter(log_dir)

    def end_epoch(self, record: dict) -> None:
        """Called before the epoch's checkpoints are saved: see MetricsLog."""
        self.metrics_log.append(record)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.writer.flush()
        records = [r for r in self.metrics_log.records if math.isfinite(r.get(self.monitor, math.nan))]
        best = min(records, key=lambda r: signed(self.monitor, r[self.monitor]), default=None)
        plot_curves(self.metrics_log.records, self.curves_path, self.monitor, best and best["epoch"])

    def close(self) -> None:
        self.writer.close()


def epoch_record(epoch, train_loss, val, lrs, progress, world_size, skipped, warned, val_errors, frozen) -> dict:
    """One line of metrics.jsonl (docs/training.md lists its keys)."""
    return {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}, **lrs, "base_frozen": frozen,
            "seconds": progress.seconds, "images_per_second": progress.samples * world_size / max(progress.seconds, 1e-9),
            "skipped_images": len(skipped), "warned_images": len(warned), "val_unreadable_images": len(val_errors)}
