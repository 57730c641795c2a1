"""A training run's checkpoint lifecycle, in one place: find what to resume, check that
the resume's flags fit it, restore, warm start, save last.pth mid-epoch, and the
end-of-epoch files (epoch-N.pth, best.pth, last.pth). Reading and writing the file
formats is model/checkpoint.py's job; this module decides what goes in and when.

A checkpoint is never written from a state whose loss or weights are non-finite, so
"the last good checkpoint" is always a good one.
"""
import math
import os
import re
import shutil
from dataclasses import dataclass

import torch

from model import CheckpointError, save_checkpoint, unwrap
from model.checkpoint import read_checkpoint_file, read_model_state

from engine.train import card as run_card
from engine.train.optim import describe_schedule, schedule_spec
from engine.train.epoch import NonFiniteLossError
from engine.train.options import HIGHER_IS_BETTER

# Flags a resumed run must share with its checkpoint: with another value its numbers
# would no longer be those of one run (another metric's best, other rates, batches,
# optimiser or targets). The schedule (--decay, --lr_decay_rate, --lr_decay_freq,
# --lr_schedule, --warmup_epochs, and --epochs under cosine) is checked as a whole.
RESUME_MUST_MATCH = ("monitor", "conv_base_lr", "dense_lr", "train_batch_size", "optimizer", "weight_decay",
                     "clip_grad_norm", "freeze_base_epochs", "label_format", "score_range")
# Flags a resume may change (extend --epochs, more patience, other loaders): printed.
RESUME_MAY_CHANGE = ("epochs", "early_stopping_patience", "seed", "val_batch_size", "num_workers",
                     "save_every_steps", "strict_images", "train_csv_file", "val_csv_file", "img_path", "exact_decode")


class ResumeError(ValueError):
    """A resume or warm start that does not fit its checkpoint (a usage error, exit 2)."""


@dataclass
class RunState:
    epoch: int = 0                      # last completed epoch (1-based; 0 = none yet)
    best_value: float = None            # best value of the monitored metric so far (None: no epoch yet)
    epochs_without_improvement: int = 0
    partial_epoch: dict = None          # EpochProgress of an unfinished epoch (mid-epoch checkpoint)
    card: dict = None                   # the model card (engine/train/card.py), written into every checkpoint

    def improves(self, monitor: str, value: float) -> bool:
        return math.isfinite(value) and (self.best_value is None or signed(monitor, value) < signed(monitor, self.best_value))

    def end_epoch(self, epoch: int, monitor: str, value: float) -> bool:
        """Record a completed epoch's monitored value; True when it is the best so far."""
        improved = self.improves(monitor, value)
        if improved:
            self.best_value, self.epochs_without_improvement = value, 0
        else:
            self.epochs_without_improvement += 1
        self.epoch, self.partial_epoch = epoch, None  # the epoch is whole now
        return improved


def signed(monitor: str, value: float) -> float:
    """The monitored value as a loss: lower is better."""
    return -value if monitor in HIGHER_IS_BETTER else value


def run_schedule(args) -> dict:
    return schedule_spec(args.decay, args.lr_decay_rate, args.lr_decay_freq, args.lr_schedule, args.warmup_epochs, args.epochs)


def find_resume_checkpoint(args):
    """The checkpoint dict that --resume names, or None for a fresh start."""
    if args.resume is None:
        return None
    path = os.path.join(args.ckpt_path, "last.pth") if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(path):
        return None
    ckpt = read_checkpoint_file(path)
    if not (isinstance(ckpt, dict) and "optimizer" in ckpt and "model_args" in ckpt):
        raise ResumeError(f"--resume {path}: not a training checkpoint of ours (no optimizer state); "
                          f"to start from the weights of a released model use --warm_start")
    ckpt["path"] = path
    return ckpt


def check_resume_flags(ckpt: dict, args, log=print) -> None:
    """Refuse a resume whose run-defining flags differ from the checkpoint's; print the
    harmless differences. Checkpoints older than a recorded flag are not checked on it."""
    saved, path = ckpt.get("args", {}), ckpt["path"]
    saved_schedule = ckpt.get("schedule") or (schedule_spec(saved["decay"], saved["lr_decay_rate"], saved["lr_decay_freq"])
                                             if "decay" in saved else None)
    problems = []
    if saved_schedule is not None and saved_schedule != run_schedule(args):
        problems.append(f"learning-rate schedule: checkpoint {describe_schedule(saved_schedule)}, "
                        f"flags {describe_schedule(run_schedule(args))}")
    monitor = ckpt.get("monitor", saved.get("monitor"))
    for name in RESUME_MUST_MATCH:
        old = monitor if name == "monitor" else saved.get(name)
        if old is not None and old != getattr(args, name):
            problems.append(f"--{name}: checkpoint {old}, flags {getattr(args, name)}")
    if problems:
        raise ResumeError(f"--resume {path}: these flags differ from the run being resumed, whose numbers would "
                          f"no longer be one run's: " + "; ".join(problems) + ". Pass the checkpoint's values, or "
                          f"start a new run from its weights (--init_from {path}, in another --ckpt_path)")
    changed = [f"--{n} {saved[n]} -> {getattr(args, n)}" for n in RESUME_MAY_CHANGE
               if n in saved and saved[n] != getattr(args, n)]
    if changed:
        log(f"resuming with changed flags: {', '.join(changed)}")


def restore(ckpt: dict, model, optimizer, scheduler, rank: int = 0) -> RunState:
    """Load a resumed checkpoint into the model, optimiser and scheduler."""
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    partial = ckpt.get("partial_epoch")
    if partial and rank != 0:
        # The saved loss sum and count are rank 0's: counted once (by rank 0), not once per rank.
        partial = dict(partial, loss_sum=0.0, loss_count=0)
    return RunState(ckpt["epoch"], saved_best_value(ckpt), ckpt["epochs_without_improvement"], partial)


def saved_best_value(ckpt: dict):
    """The best monitored value a checkpoint records. Checkpoints before `best_value`
    stored it sign-adjusted as `best_val_loss` (minus the value for metrics where higher
    is better, inf before the first epoch)."""
    if "best_value" in ckpt:
        return ckpt["best_value"]
    old = ckpt["best_val_loss"]
    return None if not math.isfinite(old) else signed(ckpt.get("monitor") or ckpt.get("args", {}).get("monitor", "val_emd"), old)


def read_warm_start(args):
    """(path, weights, model_args, note) of --warm_start's epoch-<warm_start_epoch>.pth,
    ours or a released bare state_dict. Its model arguments are the checkpoint's, so the
    model keeps training on the inputs it was trained on."""
    path = os.path.join(args.ckpt_path, f"epoch-{args.warm_start_epoch}.pth")
    weights, model_args, note = read_model_state(read_checkpoint_file(path), path, normalize=args.normalize)
    return path, weights, model_args, note


def read_init_from(args):
    """(path, weights, model_args, note) of --init_from: any checkpoint of ours or a
    released bare state_dict, read like a warm start's."""
    path = args.init_from
    weights, model_args, note = read_model_state(read_checkpoint_file(path), path, normalize=args.normalize)
    return path, weights, model_args, note


def load_warm_start(model, weights: dict, path, base_model: str, flag: str = "--warm_start") -> None:
    """Only the weights (the reference's warm start, or --init_from); the optimiser starts anew."""
    try:
        unwrap(model).load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{flag}: {path} does not fit a {base_model} NIMA: {exc}") from exc


def check_finite(model, progress=None) -> None:
    """Raise NonFiniteLossError when the loss so far or any weight is NaN or infinite."""
    if progress is not None and not math.isfinite(progress.sync().loss_sum):
        raise NonFiniteLossError(f"loss became {progress.loss_sum} by step {progress.steps}")
    for name, p in unwrap(model).named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteLossError(f"weight {name} became non-finite")


class RunCheckpoints:
    """The checkpoint files of one run in ckpt_dir. Only rank 0 makes one."""

    def __init__(self, ckpt_dir, args, model_args, model, optimizer, scheduler):
        self.ckpt_dir, self.args, self.model_args = ckpt_dir, args, dict(model_args)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        remove_partial_writes(ckpt_dir)

    def state_dict(self, state: RunState, mid_epoch: bool = False) -> dict:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "schedule": run_schedule(self.args),
                "epoch": state.epoch, "best_value": state.best_value,
                "epochs_without_improvement": state.epochs_without_improvement,
                "partial_epoch": state.partial_epoch, "monitor": self.args.monitor,
                "args": dict(vars(self.args)), "model_args": dict(self.model_args),
                "card": run_card.saved(state.card, mid_epoch) if state.card is not None else None}

    def save_last(self, state: RunState, progress) -> None:
        """last.pth in the middle of an epoch (every --save_every_steps, or on a signal)."""
        check_finite(self.model, progress)
        state.partial_epoch = progress.to_dict()
        save_checkpoint(self._path("last.pth"), self.state_dict(state, mid_epoch=True))

    def end_epoch(self, state: RunState, improved: bool, record: dict = None, val_means=()) -> None:
        """last.pth always; epoch-N.pth (the reference's name) and best.pth when the
        monitored metric improved. Each file is written atomically, last.pth last: a run
        killed in between resumes from the previous epoch and rewrites the others,
        instead of going on from a last.pth whose best.pth was never written.
        record (the epoch's metrics.jsonl line) and val_means (the predicted means of the
        validation images) update the model card first."""
        check_finite(self.model)
        if state.card is not None and record is not None:
            run_card.end_epoch(state.card, state.epoch, record, improved, self.args.monitor, val_means)
        ckpt = self.state_dict(state)
        if improved:
            save_checkpoint(self._path(f"epoch-{state.epoch}.pth"), ckpt)
            save_checkpoint(self._path("best.pth"), ckpt)
        save_checkpoint(self._path("last.pth"), ckpt)

    def _path(self, name):
        return os.path.join(self.ckpt_dir, name)


# A checkpoint is written to ".<name>.<random>.tmp" beside it and renamed (fileio);
# a run killed outright (SIGKILL, power loss) mid-write leaves that temporary behind.
_PARTIAL_WRITE = re.compile(r"^\.(last|best|epoch-\d+)\.pth\.[^.]+\.tmp$")


def remove_partial_writes(ckpt_dir, log=print) -> None:
    """Remove the half-written checkpoints a killed run left in ckpt_dir (the files
    they would have replaced are intact); said, so nothing vanishes silently."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in sorted(os.listdir(ckpt_dir)):
        if _PARTIAL_WRITE.match(name):
            os.remove(os.path.join(ckpt_dir, name))
            log(f"removed {os.path.join(ckpt_dir, name)}: a half-written checkpoint of a run that was killed")


def last_good_checkpoint(ckpt_dir) -> str:
    last = os.path.join(ckpt_dir, "last.pth")
    if os.path.exists(last):
        return f"The last good checkpoint, {last}, is intact (checkpoints are only written from finite weights)."
    return "No checkpoint was written."


def remove_if_no_checkpoint(folder) -> None:
    """A run that this call started in a new folder and that failed before its first
    checkpoint leaves no folder behind (only TensorBoard's empty start would be there)."""
    if os.path.isdir(folder) and not any(name.endswith(".pth") for name in os.listdir(folder)):
        shutil.rmtree(folder, ignore_errors=True)
