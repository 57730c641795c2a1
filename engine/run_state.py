"""What a training run carries across restarts and writes as it goes: checkpoints in the
--ckpt_path folder, the per-epoch metrics log, TensorBoard events and curves.png. Only
rank 0 writes."""
import json
import math
import os
from dataclasses import dataclass

from model import CheckpointError, save_checkpoint, strip_wrapper_prefixes, unwrap
from model.checkpoint import is_released_state_dict, read_checkpoint_file

from fileio import atomic_write_text
from .plots import plot_curves

HIGHER_IS_BETTER = {"val_srcc_mean", "val_plcc_mean", "val_accuracy", "val_srcc_std", "val_plcc_std"}
LOWER_IS_BETTER = {"val_emd", "val_emd_r1", "val_mae_mean", "val_rmse_mean"}
MONITORS = sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)


@dataclass
class RunState:
    epoch: int = 0                      # last completed epoch (1-based; 0 = none yet)
    best_val_loss: float = math.inf     # best value of the monitored metric, sign-adjusted (lower is better)
    epochs_without_improvement: int = 0
    partial_epoch: dict = None          # EpochProgress of an unfinished epoch (mid-epoch checkpoint)

    def improves(self, monitor: str, value: float) -> bool:
        return math.isfinite(value) and signed(monitor, value) < self.best_val_loss


def signed(monitor: str, value: float) -> float:
    """The monitored value as a loss: lower is better."""
    return -value if monitor in HIGHER_IS_BETTER else value


def checkpoint_dict(model, optimizer, scheduler, state: RunState, args, model_args) -> dict:
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": state.epoch, "best_val_loss": state.best_val_loss,
            "epochs_without_improvement": state.epochs_without_improvement,
            "partial_epoch": state.partial_epoch, "monitor": args.monitor,
            "args": {k: v for k, v in vars(args).items()}, "model_args": dict(model_args)}


def restore(ckpt: dict, model, optimizer, scheduler) -> RunState:
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    return RunState(ckpt["epoch"], ckpt["best_val_loss"], ckpt["epochs_without_improvement"], ckpt.get("partial_epoch"))


def load_warm_start_weights(path, model, base_model: str) -> None:
    """The reference's warm start: only the weights of epoch-N.pth (ours or the released
    format); the optimiser starts anew."""
    ckpt = read_checkpoint_file(path)
    state = strip_wrapper_prefixes(ckpt if is_released_state_dict(ckpt) else ckpt["model"])
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"--warm_start: {path} does not fit a {base_model} NIMA: {exc}") from exc


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
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def save_run_checkpoints(ckpt_dir, ckpt: dict, improved: bool) -> None:
    """last.pth always; epoch-N.pth (the reference's name) and best.pth when the monitored
    metric improved. Each file is written atomically, last.pth last: a run killed in
    between resumes from the previous epoch and rewrites the others, instead of going on
    from a last.pth whose best.pth was never written."""
    if improved:
        save_checkpoint(os.path.join(ckpt_dir, f"epoch-{ckpt['epoch']}.pth"), ckpt)
        save_checkpoint(os.path.join(ckpt_dir, "best.pth"), ckpt)
    save_checkpoint(os.path.join(ckpt_dir, "last.pth"), ckpt)


class RunOutputs:
    """Everything rank 0 writes for a run: metrics.jsonl, checkpoints, TensorBoard scalars
    and curves.png."""

    def __init__(self, ckpt_dir, log_dir, snapshot_dir, monitor: str, completed_epochs: int):
        from tensorboardX import SummaryWriter  # imported here: only rank 0 needs it
        self.ckpt_dir, self.monitor = ckpt_dir, monitor
        self.curves_path = os.path.join(snapshot_dir, "curves.png")
        self.writer = SummaryWriter(log_dir)
        self.metrics_log = MetricsLog(os.path.join(ckpt_dir, "metrics.jsonl"), completed_epochs)

    def end_epoch(self, record: dict, ckpt: dict, improved: bool) -> None:
        self.metrics_log.append(record)  # before the checkpoint: see MetricsLog
        save_run_checkpoints(self.ckpt_dir, ckpt, improved)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.writer.flush()
        plot_curves(self.metrics_log.records, self.curves_path, self.monitor)

    def close(self) -> None:
        self.writer.close()
