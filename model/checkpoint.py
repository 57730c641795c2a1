"""Checkpoint reading and writing.

Two formats are read (design.md 3.1 and 3.2): the reference's released bare
state_dict, and our dict with `model` and `model_args`. Every file is read with
`weights_only=True`, so a checkpoint can never run code when it is loaded.
"""
import pickle

import torch

from fileio import atomic_path

from .nima import build_model, default_model_args

FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    pass


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Remove DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes,
    wherever they sit in a key (`features.module.0.weight` from the reference's
    --multi_gpu becomes `features.0.weight`)."""
    clean = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
        clean[".".join(parts)] = value
    return clean


def read_checkpoint_file(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} needs arbitrary unpickling (it holds objects other than tensors and "
            f"plain Python values), so it was refused rather than executed: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file: {exc}") from exc


def is_released_state_dict(obj) -> bool:
    return isinstance(obj, dict) and "model" not in obj and any(
        str(k).startswith("features.") for k in obj)


def load_for_inference(path, device="cpu"):
    """Return (model in eval mode on `device`, model_args) from either checkpoint format."""
    ckpt = read_checkpoint_file(path)
    if is_released_state_dict(ckpt):
        state = strip_wrapper_prefixes(ckpt)
        # The released VGG16 was trained on ToTensor() inputs with no mean/std normalisation.
        model_args = dict(default_model_args("vgg16"), normalize="none")
    elif isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        state = strip_wrapper_prefixes(ckpt["model"])
        model_args = ckpt["model_args"]
    else:
        raise CheckpointError(
            f"checkpoint {path}: neither a NIMA training checkpoint (a dict with 'model' and "
            f"'model_args') nor the reference's released state_dict (keys 'features.N.*', 'classifier.1.*')")
    model = build_model(model_args, pretrained="none")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit a {model_args['base_model']} NIMA: {exc}") from exc
    return model.to(device).eval(), model_args


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path, state: dict) -> None:
    """Write `state` atomically: a crash at any moment leaves the old file or the new one."""
    state = dict(state, format_version=FORMAT_VERSION)
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch.save reports a full disk (or any failed write) this way
            raise OSError(f"torch.save failed: {exc}") from exc
