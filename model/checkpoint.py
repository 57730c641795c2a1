"""Checkpoint reading and writing.

Two formats are read (README, "Checkpoint formats"): the reference implementation's
released bare state_dict, and our dict with `model` and `model_args`. Every file is
read with `weights_only=True`, so a checkpoint can never run code when it is loaded.
"""
import itertools
import pickle
from collections import OrderedDict
import sys
import zipfile

import torch

from fileio import atomic_path

from .constants import NORMALIZE_CHOICES
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


def _looks_like_torch_file(path) -> bool:
    """torch.save writes a zip archive (torch >= 1.6) or, before that, a pickle stream
    (first byte 0x80, the pickle protocol marker). Anything else is no checkpoint."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


# Checkpoints written before flag defaults became None recorded three model flags as
# instances of marker subclasses of str and float (engine.flags._DefaultStr/_DefaultFloat,
# since removed). They are read back as the plain str and float they stand for; nothing
# else outside weights_only's own allowlist is.
_LEGACY_MARKERS = [(str, "engine.flags._DefaultStr"), (float, "engine.flags._DefaultFloat")]


def torch_load(path, **kwargs):
    """torch.load with weights_only=True (never runs code from the file), on the CPU."""
    with torch.serialization.safe_globals(_LEGACY_MARKERS):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def recorded_args(path) -> dict:
    """The flags a checkpoint of ours records (`args`), read without loading its tensors;
    {} for a bare state_dict or a file that cannot be read this way (its loader reports why)."""
    try:
        ckpt = torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - the legacy format cannot be mapped, and holds no args
        return {}
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    return saved if isinstance(saved, dict) else {}


def read_checkpoint_file(path) -> dict:
    try:
        is_torch_file = _looks_like_torch_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path}: a folder, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read: {exc.strerror or exc}") from None
    if not is_torch_file:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (expected what torch.save writes: "
                              f"one of our .pth checkpoints or the reference's released state_dict)")
    try:
        return torch_load(path)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} holds Python objects other than tensors and plain values (a pickled model or "
            f"class), so it was refused rather than executed; save its state_dict() and load that") from None
    except Exception as exc:  # a zip that is not a torch archive, a file cut short, ...
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{reason}); the file may be cut short or not a checkpoint at all") from None


def is_released_state_dict(obj) -> bool:
    return isinstance(obj, dict) and "model" not in obj and any(
        str(k).startswith("features.") for k in obj)


def released_normalize_note(path) -> str:
    return (f"note: {path} is a bare state_dict (the reference implementation's release format), which does not "
            f"record its preprocessing; assumed --normalize none, right for the 2018-2020 release (epoch-82.pth). "
            f"For the June 2021 release (epoch-34.pth), trained with ImageNet mean/std, pass --normalize imagenet")


def read_model_state(ckpt, path, normalize=None) -> tuple:
    """(weights, model_args, note) of a checkpoint dict in either format.

    normalize: for a bare state_dict, which input normalisation it was trained with
    ('none': the reference's 2018-2020 release; 'imagenet': its June 2021 release).
    Nothing in such a file says which, so without it 'none' is assumed and `note` says
    so. For our checkpoints the recorded value is used, and a different `normalize` is
    an error naming both."""
    if normalize is not None and normalize not in NORMALIZE_CHOICES:
        raise CheckpointError(f"--normalize {normalize!r}: valid values are {', '.join(NORMALIZE_CHOICES)}")
    if is_released_state_dict(ckpt):
        model_args = dict(default_model_args("vgg16"), normalize=normalize or "none")
        return strip_wrapper_prefixes(ckpt), model_args, "" if normalize else released_normalize_note(path)
    if isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        model_args = dict(ckpt["model_args"])
        if normalize is not None and normalize != model_args["normalize"]:
            raise CheckpointError(f"--normalize {normalize} contradicts {path}, which was trained with "
                                  f"normalize {model_args['normalize']!r} (recorded in the checkpoint); drop the flag")
        return strip_wrapper_prefixes(ckpt["model"]), model_args, ""
    raise CheckpointError(
        f"checkpoint {path}: neither a NIMA training checkpoint (a dict with 'model' and "
        f"'model_args') nor the reference's released state_dict (keys 'features.N.*', 'classifier.1.*')")


def load_for_inference(path, device="cpu", normalize=None):
    """Return (model in eval mode on `device`, model_args) from either checkpoint format;
    `normalize` as read_model_state's. The assumption note goes to stderr."""
    state, model_args, note = read_model_state(read_checkpoint_file(path), path, normalize)
    if note:
        print(note, file=sys.stderr)
    # Built on the meta device: no memory and no random initialisation for weights the
    # checkpoint replaces (VGG16 would also initialise 102M fc6/fc7 weights the head drops:
    # about 1 s and 400 MB on a laptop), then the checkpoint's tensors are assigned.
    with torch.device("meta"):
        model = build_model(model_args, pretrained="none")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit a {model_args['base_model']} NIMA: {exc}") from exc
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        # A tensor the state_dict does not hold (a non-persistent buffer): build for real.
        model = build_model(model_args, pretrained="none")
        model.load_state_dict(state)
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


# What a checkpoint may hold, by exact type (a subclass of str is not a str here: pickle
# records its class, and weights_only loading refuses it).
_PLAIN_SCALARS = (type(None), bool, int, float, str)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def check_plain(value, key: str) -> None:
    """Raise CheckpointError, naming the key, for anything in `value` other than tensors,
    plain scalars and dicts, lists and tuples of them: what `torch.load(...,
    weights_only=True)` reads back without an allowlist."""
    kind = type(value)
    if kind in _PLAIN_SCALARS or kind in _TENSOR_TYPES:
        return
    if kind in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise CheckpointError(f"checkpoint key {key}[{k!r}] is a {_type_name(k)}, not a str or int")
            check_plain(v, f"{key}[{k!r}]")
        return
    if kind in (list, tuple):
        for n, v in enumerate(value):
            check_plain(v, f"{key}[{n}]")
        return
    raise CheckpointError(f"checkpoint value {key} is a {_type_name(value)} ({value!r:.60}), not a plain Python value "
                          f"or a tensor: it would not load with weights_only=True, so it was not saved")


def _type_name(value) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def save_checkpoint(path, state: dict) -> None:
    """Write `state` atomically: a crash at any moment leaves the old file or the new one.
    Every value is checked first (check_plain): a checkpoint that its own loader would
    refuse is never written."""
    state = dict(state, format_version=FORMAT_VERSION)
    for key, value in state.items():
        check_plain(value, key)
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch.save reports a full disk (or any failed write) this way
            raise OSError(f"torch.save failed: {exc}") from exc
