"""Labels given as a mean opinion score (MOS): CSVs of `image_id,mos[,std]`.

Quality data sets (TID2013, KonIQ-10k, LIVE in the Wild, ...) label each image with the
mean of its ratings, often with their standard deviation, on the data set's own scale.
`--score_range LO HI` maps that scale linearly onto the bins 1..10 (LO -> 1, HI -> 10,
a std scaled alike), and each image's training target is the maximum-entropy
distribution over the bins with that mean (and std): dataset/maxent.py.

The file is read and checked as the 10-bin label CSVs are (dataset/labels.py, whose
parts this module uses): a header row is recognised, and every problem of a file is
reported together with its line and column before any training starts. A file gives a
std for every row or for none.
"""
import math
from dataclasses import dataclass

import numpy as np

from model.constants import NUM_BINS

from .label_text import LabelFileError, column_count_problems, label_rows, parse_number, read_label_text, show_cell
from .labels import ImageIndex, LabelTable, SameFileCheck, checked_widths, row_image
from .maxent import maxent_distributions

LABEL_FORMATS = ("distribution", "mos")


@dataclass
class MosTable(LabelTable):
    mos: np.ndarray = None          # (N,) float64 on the data set's scale, or None without labels
    std: np.ndarray = None          # (N,) float64, or None when the file gives none
    score_range: tuple = None
    clipped: int = 0                # rows whose std 10 bins cannot reach at their mean
    clipped_example: str = ""       # the first of them, for the log


def check_score_range(score_range, flag="--score_range") -> tuple:
    """(lo, hi) as floats, or ValueError naming the flag."""
    if score_range is None or len(score_range) != 2:
        raise ValueError(f"{flag} takes two numbers, LO HI: the lowest and highest score of the data set's scale")
    lo, hi = (float(x) for x in score_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{flag} {lo:g} {hi:g}: LO must be below HI, both finite")
    return lo, hi


def to_bins(score, score_range):
    """Scores on the data set's scale LO..HI -> the bins' scale 1..10."""
    lo, hi = score_range
    return 1 + (NUM_BINS - 1) * (np.asarray(score, np.float64) - lo) / (hi - lo)


def from_bins(mean, score_range):
    """A mean on the bins' scale 1..10 -> the data set's scale LO..HI."""
    lo, hi = score_range
    return lo + (np.asarray(mean, np.float64) - 1) * (hi - lo) / (NUM_BINS - 1)


def std_to_bins(std, score_range):
    lo, hi = score_range
    return np.asarray(std, np.float64) * (NUM_BINS - 1) / (hi - lo)


def read_mos_csv(csv_path, img_path, score_range, require_labels=True, require_images=True) -> MosTable:
    """Read and validate a MOS CSV; raise LabelFileError listing every bad row.

    Rows: `image_id,mos` or `image_id,mos,std` (and, without require_labels, `image_id`
    alone). `dists` holds the maximum-entropy targets (float32), `clipped` counts the rows
    whose std was out of reach at their mean (the closest reachable std was used)."""
    lo, hi = check_score_range(score_range)
    text = read_label_text(csv_path)
    index = ImageIndex(img_path)
    problems, rows, same_file, bad_widths = [], [], SameFileCheck(), []
    valid = "2 (image id, MOS) or 3 (image id, MOS, std)" + ("" if require_labels else ", or 1 (image id only)")
    for row in label_rows(text, index):
        line, cells = row.first_line, row.cells
        if row.error:
            problems.append(f"{line}: cannot be parsed as CSV: {row.error}")
            continue
        if len(cells) not in (2, 3) and not (len(cells) == 1 and not require_labels):
            bad_widths.append((line, len(cells)))
            continue
        image_id, bad = cells[0], []
        if not image_id:
            bad.append(f"{line}, column 1: empty image id")
        values = [parse_number(c) for c in cells[1:]]
        for col, (text_value, value) in enumerate(zip(cells[1:], values), start=2):
            if value is None or not math.isfinite(value):
                bad.append(f"{line}, column {col}: {show_cell(text_value)} is not a finite number")
            elif col == 2 and not lo <= value <= hi:
                bad.append(f"{line}, column 2: MOS {text_value[:40]} is outside --score_range {lo:g} {hi:g}")
            elif col == 3 and value < 0:
                bad.append(f"{line}, column 3: negative std {text_value[:40]}")
        path = row_image(index, image_id, line, require_images, same_file, bad)
        problems.extend(bad)
        if not bad:
            rows.append((image_id, path, line, values))
    ten = {NUM_BINS + 1: "10 ratings: a distribution file, which is read without --label_format mos"}
    widths = checked_widths(csv_path, column_count_problems(bad_widths, valid, ten) + problems, rows)
    if len(widths) > 1:
        counts = {w: sum(len(r[3]) == w for r in rows) for w in widths}
        first = {w: next(r[2] for r in rows if len(r[3]) == w) for w in widths}
        kinds = {0: "no MOS", 1: "a MOS without std", 2: "a MOS and a std"}
        raise LabelFileError(csv_path, ["0: rows differ: " + ", ".join(
            f"{counts[w]} with {kinds[w]} (first on line {first[w]})" for w in sorted(widths)) + "; give every row the same columns"])
    table = MosTable(csv_path, ids=[r[0] for r in rows], paths=[r[1] for r in rows], lines=[r[2] for r in rows],
                     score_range=(lo, hi))
    if widths != {0}:
        values = np.asarray([r[3] for r in rows], dtype=np.float64)
        table.mos = values[:, 0]
        table.std = values[:, 1] if values.shape[1] == 2 else None
        result = maxent_distributions(to_bins(table.mos, (lo, hi)).clip(1, NUM_BINS),
                                      None if table.std is None else std_to_bins(table.std, (lo, hi)))
        table.dists = result.dists.astype(np.float32)
        table.clipped = int(result.clipped.sum())
        if table.clipped:
            k = int(np.nonzero(result.clipped)[0][0])
            reached = float(result.std[k]) * (hi - lo) / (NUM_BINS - 1)
            table.clipped_example = (f"line {table.lines[k]}: MOS {table.mos[k]:g}, std {table.std[k]:g} -> "
                                     f"{reached:.4g}")
    return table


def clipped_note(table) -> str:
    """The log line about rows whose std 10 bins cannot reach, or '' when there are none."""
    if not getattr(table, "clipped", 0):
        return ""
    return (f"{table.csv_path}: {table.clipped} of {len(table)} rows have a std that 10 bins cannot reach at their "
            f"MOS (too small or too large for that mean); their targets use the closest reachable std "
            f"(first: {table.clipped_example})")


def resolve_label_flags(label_format, score_range, recorded: dict) -> tuple:
    """(label format, score range or None) for scoring with a checkpoint: the flags when
    given, else what the checkpoint's run recorded (`recorded`: its args), else 10-bin
    distributions. ValueError, naming the flag, for a MOS format without a range."""
    fmt = label_format or recorded.get("label_format") or "distribution"
    if fmt != "mos":
        if score_range is not None:
            raise ValueError("--score_range goes with --label_format mos (the 10-bin label files need no range)")
        return fmt, None
    if score_range is None and recorded.get("label_format") == "mos":
        score_range = recorded.get("score_range")
    if score_range is None:
        raise ValueError("--label_format mos needs --score_range LO HI (the data set's scale); the checkpoint records none")
    return fmt, check_score_range(score_range)
