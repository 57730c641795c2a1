"""The optimiser and the learning-rate schedule: the one place to change either.

The reference's recipe: SGD with momentum 0.9, one learning rate for the conv base and
one for the head, and (with --decay) both multiplied by lr_decay_rate every
lr_decay_freq epochs. The rate of epoch e (1-based) is base * rate ** ((e - 1) // freq):
a function of the absolute epoch, so a warm start at epoch N continues the schedule.
"""
import torch


def build_optimizer(model, conv_base_lr: float, dense_lr: float, device: torch.device) -> torch.optim.Optimizer:
    # foreach: one fused kernel launch per parameter group on CUDA; the default elsewhere.
    return torch.optim.SGD(model.param_groups(conv_base_lr, dense_lr), momentum=0.9,
                           foreach=True if device.type == "cuda" else None)


def schedule_spec(decay: bool, lr_decay_rate: float, lr_decay_freq: int) -> dict:
    """What the checkpoint records about the schedule, so that a resume can check it."""
    if not decay:
        return {"kind": "constant"}
    return {"kind": "step", "step_size": int(lr_decay_freq), "gamma": float(lr_decay_rate)}


def build_scheduler(optimizer, spec: dict, completed_epochs: int = 0):
    """The scheduler of `spec` (None for a constant rate), positioned after
    `completed_epochs` epochs: the rates are those of epoch completed_epochs + 1."""
    if spec["kind"] == "constant":
        return None
    if spec["kind"] != "step":
        raise ValueError(f"unknown learning-rate schedule {spec['kind']!r}; valid: constant, step")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec["step_size"], gamma=spec["gamma"])
    if completed_epochs:
        # StepLR's own state after `completed_epochs` steps, in closed form (stepping it
        # before any optimiser step would warn, and a loop is needless).
        factor = spec["gamma"] ** (completed_epochs // spec["step_size"])
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        scheduler.last_epoch = completed_epochs
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def current_lrs(optimizer) -> dict:
    """{'lr_conv_base': ..., 'lr_dense': ...}: the rates of the epoch about to run."""
    return {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
