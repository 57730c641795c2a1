"""The model card of a training run (model/card.py says what a card holds and how it
reads): begun when the run is set up, given the label files' names and sizes once they
are read, updated at the end of every epoch, and carried across a resume. Only rank 0's
card is written."""
import copy
import math
import os
import subprocess

from model.card import BEST_FIGURES, MIN_PERCENTILE_IMAGES, empty_card, finish, now, older_card, quantiles_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit():
    """The project's commit (40 hex digits) when it runs from its own git checkout, else
    None (no git, or the project copied into some other repository's tree)."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    lines = out.stdout.splitlines()  # the top folder (its name may hold spaces), then the commit
    if out.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(ROOT):
        return None
    return lines[1] if len(lines[1]) == 40 else None


def _pretrained(value):
    """--pretrained as the card shows it: imagenet, none, or the weights file's name (never
    its folder: cards are shown to strangers by the scoring service)."""
    return value if value in ("imagenet", "none", None) else f"file {os.path.basename(value)}"


def new_card(flags: dict, model_args: dict, parent=None, parent_name=None, flag=None) -> dict:
    """The card of a new run. parent: the card of the checkpoint it starts from
    (--warm_start, --init_from; model.card.read_card), whose origin it inherits."""
    card = empty_card(model_args)
    card.update(pretrained=_pretrained(flags.get("pretrained")), from_scratch=flags.get("pretrained") == "none",
                label_format=flags.get("label_format") or "distribution", monitor=flags.get("monitor"),
                score_range=[float(x) for x in flags["score_range"]] if flags.get("score_range") else [1.0, 10.0],
                git_commit=git_commit(), created=now())
    if parent is not None:
        card.update(pretrained=parent.get("pretrained"), from_scratch=parent.get("from_scratch"),
                    started_from={"checkpoint": os.path.basename(parent_name), "flag": flag, "kind": parent.get("kind"),
                                  "images_total": parent.get("images_total")})
    return card


def resumed_card(ckpt: dict, flags: dict, model_args: dict) -> dict:
    """The card a resumed run goes on with: its checkpoint's, or for a checkpoint written
    before cards one begun from what it records (its earlier best epoch stays unknown)."""
    if isinstance(ckpt.get("card"), dict):
        card = copy.deepcopy(ckpt["card"])
    else:
        card = new_card(ckpt.get("args") or flags, model_args)
        old = older_card(ckpt)
        card.update(pretrained=old["pretrained"], from_scratch=old["from_scratch"], created=None,
                    note="begun on a resume of a checkpoint written before model cards: the best epoch is the best "
                         "since that resume")
    card["git_commit"] = git_commit()  # the code that goes on training
    return card


def set_data(card: dict, flags: dict, train_rows: int, val_rows: int) -> None:
    """The label files (names only) and their rows, and the images the weights have been
    trained on in all: this run's and, where known, those of the checkpoint it started from."""
    card["train_csv"] = {"file": os.path.basename(flags["train_csv_file"]), "rows": int(train_rows)}
    card["val_csv"] = {"file": os.path.basename(flags["val_csv_file"]), "rows": int(val_rows)}
    start = card.get("started_from")
    before = start.get("images_total") if start else 0
    card["images_total"] = None if before is None else before + int(train_rows)


def _plain(value):
    """A figure as a card holds it: NaN (an undefined correlation) becomes None, which
    JSON answers can carry."""
    return value if not (isinstance(value, float) and not math.isfinite(value)) else None


def end_epoch(card: dict, epoch: int, record: dict, improved: bool, monitor: str, val_means) -> None:
    """An epoch's end (record: its metrics.jsonl line): the epochs, the unreadable images,
    the best epoch's figures when it improved, and the percentiles of the weights now
    saved: the quantiles of their predicted means on the validation set."""
    card.update(epochs=int(epoch), monitor=monitor,
                unreadable_images={"train": int(record["skipped_images"]), "val": int(record["val_unreadable_images"])})
    if improved:
        card["best"] = {"epoch": int(epoch), **{k: _plain(record[k]) for k in dict.fromkeys(BEST_FIGURES + (monitor,))}}
    n = len(val_means)
    card["percentiles"] = None if n < MIN_PERCENTILE_IMAGES else {
        "quantiles": quantiles_of(val_means), "images": n, "csv": (card.get("val_csv") or {}).get("file"),
        "set": "validation", "epoch": int(epoch), "date": now()}


def saved(card: dict, mid_epoch: bool = False) -> dict:
    """A copy of the card, with its toy verdict, for a checkpoint written now. Mid-epoch
    (last.pth every --save_every_steps, or on a signal) the weights are no longer those
    the percentiles were computed for, so that file carries none."""
    out = copy.deepcopy(card)
    out["date"] = now()
    if mid_epoch:
        out["percentiles"] = None
    return finish(out)
