"""The optimiser and the learning-rate schedule: the one place to change either.

The reference's recipe (the default): SGD with momentum 0.9, one learning rate for the
conv base and one for the head, and (with --decay) both multiplied by lr_decay_rate
every lr_decay_freq epochs. The rate of epoch e (1-based) is base * rate ** ((e - 1) // freq).

--optimizer adamw and --lr_schedule cosine give a modern recipe: AdamW, a linear warm-up
over --warmup_epochs, then a cosine from the flags' rates down towards 0 at --epochs.
Every schedule is a function of the absolute epoch, so a warm start at epoch N or a
resume continues it, and its spec is recorded in the checkpoint (a resume must match it).
"""
import math

import torch

from engine.train.options import OPTIMIZERS


def build_optimizer(model, conv_base_lr: float, dense_lr: float, device: torch.device,
                    optimizer: str = "sgd", weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimiser over the model's two parameter groups (`conv_base`, `dense`). With
    weight decay, biases and normalisation weights (1-D tensors) are not decayed: shrinking
    them towards 0 regularises nothing and shifts the layers' outputs."""
    groups = model.param_groups(conv_base_lr, dense_lr)
    if weight_decay:
        split = []
        for group in groups:
            for decayed in (True, False):
                params = [p for p in group["params"] if (p.ndim > 1) == decayed]
                if params:
                    split.append(dict(group, params=params, weight_decay=weight_decay if decayed else 0.0))
        groups = split
    # foreach: one fused kernel launch per parameter group on CUDA; the default elsewhere.
    foreach = True if device.type == "cuda" else None
    if optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay, foreach=foreach)
    if optimizer == "adamw":
        # weight_decay given explicitly: AdamW's own default (0.01) would apply when the flag is 0.
        return torch.optim.AdamW(groups, weight_decay=weight_decay, foreach=foreach)
    raise ValueError(f"--optimizer {optimizer!r}: valid values are {', '.join(OPTIMIZERS)}")


def schedule_spec(decay: bool, lr_decay_rate: float, lr_decay_freq: int, lr_schedule: str = "step",
                  warmup_epochs: int = 0, epochs: int = None) -> dict:
    """What the checkpoint records about the schedule, so that a resume can check it."""
    if lr_schedule == "cosine":
        return {"kind": "cosine", "epochs": int(epochs), "warmup_epochs": int(warmup_epochs)}
    if not decay:
        return {"kind": "constant"}
    return {"kind": "step", "step_size": int(lr_decay_freq), "gamma": float(lr_decay_rate)}


def cosine_factor(spec: dict, epoch: int) -> float:
    """The rate of `epoch` (1-based) as a fraction of the flag's rate: epochs 1..W of the
    warm-up at 1/(W+1), 2/(W+1), ..., then half a cosine from 1 at epoch W+1, reaching
    (T-W-1)/(T-W) of the way down at the last epoch T (not 0: the last epoch still learns)."""
    warmup, total = spec["warmup_epochs"], spec["epochs"]
    if epoch <= warmup:
        return epoch / (warmup + 1)
    progress = min((epoch - warmup - 1) / max(total - warmup, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, spec: dict, completed_epochs: int = 0):
    """The scheduler of `spec` (None for a constant rate), positioned after
    `completed_epochs` epochs: the rates are those of epoch completed_epochs + 1."""
    if spec["kind"] == "constant":
        return None
    if spec["kind"] == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec["step_size"], gamma=spec["gamma"])
        factor = spec["gamma"] ** (completed_epochs // spec["step_size"])
    elif spec["kind"] == "cosine":
        # LambdaLR counts completed epochs from 0; a plain function is not stored in its
        # state_dict, so checkpoints stay plain values.
        def rate_after(completed):
            return cosine_factor(spec, completed + 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate_after)
        factor = rate_after(completed_epochs)
    else:
        raise ValueError(f"unknown learning-rate schedule {spec['kind']!r}; valid: constant, step, cosine")
    if completed_epochs:
        # The scheduler's own state after `completed_epochs` steps, in closed form (stepping
        # it before any optimiser step would warn, and a loop is needless).
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        scheduler.last_epoch = completed_epochs
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def describe_schedule(spec: dict) -> str:
    """The flags that give `spec`, for messages."""
    if spec["kind"] == "constant":
        return "constant (no --decay)"
    if spec["kind"] == "cosine":
        return f"--lr_schedule cosine --warmup_epochs {spec['warmup_epochs']} over --epochs {spec['epochs']}"
    return f"--decay --lr_decay_rate {spec['gamma']} --lr_decay_freq {spec['step_size']}"


def base_parameters(model) -> list:
    """The parameters of the pretrained base: the conv base (and the paper head's fc6/fc7),
    everything but the new 10-way layer."""
    return model.param_groups(0.0, 0.0)[0]["params"]


def set_base_frozen(model, frozen: bool) -> None:
    """--freeze_base_epochs: stop (or restart) the base's gradients. A parameter without a
    gradient is skipped by SGD and AdamW alike: neither momentum nor weight decay moves it.
    With no parameter of the base needing one, backward stops at the head."""
    for p in base_parameters(model):
        p.requires_grad_(not frozen)
        if frozen:
            p.grad = None


def current_lrs(optimizer) -> dict:
    """{'lr_conv_base': ..., 'lr_dense': ...}: the rates of the epoch about to run."""
    return {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
