"""The model card: what a checkpoint's model is and what it was trained on, so that a
person can tell how far to trust its scores; and the percentile of a score among the
model's own predictions on its validation set.

Our checkpoints carry a card under `card` (engine/train/card.py fills it in during
training; tools.calibrate adds percentiles to any checkpoint). For older checkpoints of
ours and for the reference's bare state_dicts one is made here from what the file
records; every field it cannot know is None ("unknown"). A card holds plain values only
(save_checkpoint refuses anything else).

A toy model (`toy`: trained from scratch, or on fewer than TOY_MIN_IMAGES images) comes
with a one-line `warning`, which every scoring command prints once.
"""
import copy
import datetime
import sys

import numpy as np

from .checkpoint import CheckpointError, is_released_state_dict, read_checkpoint_file, torch_load
from .nima import default_model_args

CARD_VERSION = 1
# Fewer training images than this (this run's and those of the checkpoints it started
# from, where known) makes a toy model: AVA has about 255,000; the small public quality
# sets several thousand.
TOY_MIN_IMAGES = 3000
# Percentiles need this many scored images at least: below it, each image moves the
# share by more than 2 points and the 101 quantiles mostly interpolate between a few.
MIN_PERCENTILE_IMAGES = 50
QUANTILE_LEVELS = 101  # the quantiles at 0 %, 1 %, ..., 100 %
DOCS = "docs/model-card.md"

# The validation figures of the best epoch that every card shows (metrics.jsonl's names).
BEST_FIGURES = ("val_emd", "val_srcc_mean", "val_plcc_mean", "val_accuracy")
RELEASES = {"none": "2018-2020 release, epoch-82.pth", "imagenet": "June 2021 release, epoch-34.pth"}


def now() -> str:
    """A card's dates: UTC, to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def empty_card(model_args: dict) -> dict:
    """Every field of a card, the model's own from model_args and the rest unknown."""
    return {"card_version": CARD_VERSION, "kind": "training", "backbone": model_args["base_model"],
            "pretrained": None, "started_from": None, "from_scratch": None,
            "image_size": model_args["image_size"], "resize_size": model_args["resize_size"],
            "normalize": model_args["normalize"], "head": model_args.get("head", "reference"),
            "label_format": None, "score_range": None, "train_csv": None, "val_csv": None, "images_total": None,
            "unreadable_images": None, "epochs": None, "monitor": None, "best": None, "percentiles": None,
            "release": None, "note": None, "git_commit": None, "created": None, "date": None}


def released_card(normalize=None) -> dict:
    """The card of a bare state_dict: the reference's release that --normalize says it is."""
    card = empty_card(dict(default_model_args("vgg16"), normalize=normalize or "none"))
    card.update(kind="released", from_scratch=False, release=RELEASES[normalize or "none"], label_format="distribution",
                score_range=[1.0, 10.0],
                note=("a bare state_dict (the reference implementation's release format) records no preprocessing, "
                      "data or figures: it is taken to be the reference's " + RELEASES[normalize or "none"] +
                      (" because of --normalize " + normalize if normalize else " (assumed: no --normalize given)") +
                      ", trained on AVA by that implementation; the rest is unknown"))
    return finish(card)


def older_card(ckpt: dict) -> dict:
    """The card of a checkpoint of ours written before cards: what its flags record."""
    card = empty_card(ckpt["model_args"])
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    started = args.get("init_from") or args.get("warm_start")
    card.update(kind="older checkpoint", pretrained=None if started else args.get("pretrained"),
                from_scratch=True if (args.get("pretrained") == "none" and not started) else None,
                label_format=args.get("label_format"), epochs=ckpt.get("epoch"), monitor=ckpt.get("monitor"),
                note="written before checkpoints carried a model card: what it was trained on is unknown")
    return finish(card)


def card_from_checkpoint(ckpt, path, normalize=None) -> dict:
    """The card of a checkpoint dict in either format (normalize: as read_model_state's,
    for a bare state_dict)."""
    if is_released_state_dict(ckpt):
        return released_card(normalize)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("card"), dict):
        return finish(copy.deepcopy(ckpt["card"]))
    if isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        return older_card(ckpt)
    raise CheckpointError(f"checkpoint {path}: neither a NIMA checkpoint of ours (a dict with 'model' and 'model_args') "
                          f"nor the reference's released state_dict, so it has no model card")


def read_card(path, normalize=None) -> dict:
    """A checkpoint file's card. Our checkpoints are memory-mapped (no tensor is read);
    a file that cannot be (the reference's legacy format) is read whole. Raises
    CheckpointError, naming the file, for one that is no checkpoint."""
    try:
        ckpt = torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip archive: read_checkpoint_file reads it or says why not
        ckpt = read_checkpoint_file(path)
    return card_from_checkpoint(ckpt, path, normalize)


# ---- the toy verdict --------------------------------------------------------------------

def toy_reasons(card: dict) -> list:
    """Why the card's model is a toy, as words that follow "trained" ([] when it is not,
    or when its card cannot tell)."""
    reasons = []
    if card.get("from_scratch") is True:
        reasons.append("from scratch (--pretrained none)")
    total = card.get("images_total")
    if isinstance(total, int) and total < TOY_MIN_IMAGES:
        reasons.append(f"on only {total:,} images (fewer than {TOY_MIN_IMAGES:,}; AVA has about 255,000)")
    return reasons


def finish(card: dict) -> dict:
    """The card with its verdict set from its fields: `toy` (bool) and `warning` (one line
    of text for a toy model, else None)."""
    reasons = toy_reasons(card)
    card["toy"] = bool(reasons)
    card["warning"] = (f"toy model: {card['backbone']} trained {' '.join(reasons)}; its scores are not aesthetic "
                       f"judgements (a real model: {DOCS}, 'Getting a real model')") if reasons else None
    return card


# ---- reading a card -----------------------------------------------------------------------

def _init(card: dict) -> str:
    start = card.get("started_from")
    if start:
        return f"from {start['checkpoint']} ({start['flag']})"
    return {"imagenet": "ImageNet init", "none": "from scratch", None: "init unknown"}.get(
        card.get("pretrained"), f"init from {card.get('pretrained')}")


def summary_line(card: dict) -> str:
    """One line for the start of a scoring command, e.g. `model: vgg16 (ImageNet init),
    trained on 229,981 images of train_labels.csv, best val SRCC 0.612 at epoch 34; no
    percentiles (python -m tools.calibrate adds them)`."""
    if card.get("kind") == "released":
        line = (f"model: {card['backbone']}, taken to be the reference implementation's {card['release']} "
                f"(--normalize {card['normalize']}), trained on AVA; nothing else is recorded in the file")
    elif card.get("kind") == "training":
        train = card.get("train_csv") or {}
        line = f"model: {card['backbone']} ({_init(card)}), trained on {_show(train.get('rows'))} images of " \
               f"{train.get('file') or 'an unknown file'}"
        best = card.get("best") or {}
        if best.get("val_srcc_mean") is not None:
            line += f", best val SRCC {best['val_srcc_mean']:.3f} at epoch {best['epoch']}"
    else:
        line = f"model: {card['backbone']} ({_init(card)}), {card.get('note') or 'unknown provenance'}"
    pct = card.get("percentiles")
    return line + (f"; percentiles from {pct['images']:,} {pct.get('set', '')} images of {pct['csv']}" if pct
                   else "; no percentiles (python -m tools.calibrate adds them)")


def print_card(card: dict) -> None:
    """What a scoring command prints once at its start: the summary line (stdout) and,
    for a toy model, the warning (stderr)."""
    print(summary_line(card), flush=True)
    if card.get("warning"):
        print(f"warning: {card['warning']}", file=sys.stderr, flush=True)


# Fields whose None means "there is none" rather than "unknown".
_NONE_IS_NONE = {"started_from": "none (a new run)", "release": "none (not a release)", "note": "none",
                 "percentiles": "none (python -m tools.calibrate adds them)"}


def _show(value) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return " ".join(_show(v) for v in value)
    return str(value)


def full_text(card: dict) -> str:
    """The summary line, the warning, then every field, one per line
    (`python -m tools.model_card`); the quantiles summarised by three of them."""
    lines = [summary_line(card)] + ([f"warning: {card['warning']}"] if card.get("warning") else [])
    for key, value in card.items():
        if key == "warning":
            continue
        if key == "percentiles" and value:
            q = value["quantiles"]
            value = dict({k: v for k, v in value.items() if k != "quantiles"}, p10=q[10], median=q[50], p90=q[90])
        shown = _NONE_IS_NONE[key] if value is None and key in _NONE_IS_NONE else _show(value)
        lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


# ---- percentiles ----------------------------------------------------------------------------

def quantiles_of(means) -> list:
    """The QUANTILE_LEVELS quantiles (0 %, 1 %, ..., 100 %) of predicted means: at level
    k %, the value at position k/100 * (N - 1) of the sorted means, interpolated linearly
    between its two neighbours (numpy's default method)."""
    q = np.quantile(np.asarray(means, dtype=np.float64), np.linspace(0.0, 1.0, QUANTILE_LEVELS))
    return [float(v) for v in np.maximum.accumulate(q)]  # non-decreasing, rounding or not


def percentiles(means, quantiles) -> np.ndarray:
    """The percentile (0..100) of each mean: the share of the images behind `quantiles`
    that the model scored lower, read off the quantiles and interpolated linearly between
    neighbouring ones. Strictly lower: a mean equal to a run of equal quantiles (many
    images scored alike) gets the level where the run starts. Below the lowest: 0; at or
    above the highest: 100."""
    q = np.asarray(quantiles, dtype=np.float64)
    x = np.asarray(means, dtype=np.float64)
    step = 100.0 / (len(q) - 1)
    below = np.searchsorted(q, x, side="left")  # how many quantiles lie strictly below x
    lo, hi = q[np.clip(below - 1, 0, len(q) - 1)], q[np.clip(below, 0, len(q) - 1)]
    gap = hi - lo
    frac = np.where(gap > 0, (x - lo) / np.where(gap > 0, gap, 1.0), 1.0)
    level = np.where(below == 0, 0.0, np.where(below >= len(q), len(q) - 1.0, below - 1 + frac))
    return level * step
