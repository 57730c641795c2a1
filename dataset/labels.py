"""Label CSVs (README, "Formats"): one row per image, the id then 10 numbers for ratings 1..10.

The numbers may be vote counts or probabilities; each row is normalised to sum 1.
A header row is recognised (its rating cells are not numbers and its first cell names no
image) and skipped; every other row is kept or reported. All problems of a file are reported together, each
with its line and column, before any training starts. Whatever bytes the file holds,
the result is a valid table or a LabelFileError: UTF-8 with or without a BOM, and
LF, CRLF or CR line ends are read; UTF-16 and other encodings are reported.

The text itself (encodings, line ends, separators, rows, the header) is read by
dataset/label_text.py, the one row parser of read_label_csv, dataset/mos.py and
tools/check_images.py.
"""
import math
import os
from dataclasses import dataclass, field

import numpy as np

from model.constants import NUM_BINS

from .images import PREFERRED_EXTENSIONS, is_image_file
from .label_text import LabelFileError, column_count_problems, label_rows, parse_number, read_label_text, show_cell


@dataclass
class LabelTable:
    csv_path: str
    ids: list = field(default_factory=list)     # image ids as written in the CSV
    paths: list = field(default_factory=list)   # image file for each id
    lines: list = field(default_factory=list)   # 1-based line of each row in the CSV
    dists: np.ndarray = None                    # (N, 10) float32 rows summing to 1, or None without labels

    def __len__(self):
        return len(self.ids)


class ImageIndex:
    """Resolve image ids to files in one folder, listing the folder once (fast on 255k files)."""

    def __init__(self, img_path):
        self.img_path = img_path
        try:
            self.names = {e.name for e in os.scandir(img_path) if e.is_file()}
        except OSError:
            self.names = set()
        self.by_stem = None

    def resolve(self, image_id: str):
        """The file for `image_id`, or None when there is none."""
        if os.sep in image_id or "/" in image_id:  # ids with sub-folders: ask the file system
            candidates = [image_id] if is_image_file(image_id) else [image_id + e for e in PREFERRED_EXTENSIONS]
            return next((os.path.join(self.img_path, c) for c in candidates
                         if os.path.isfile(os.path.join(self.img_path, c))), None)
        if is_image_file(image_id) and image_id in self.names:
            return os.path.join(self.img_path, image_id)
        for ext in PREFERRED_EXTENSIONS:
            if image_id + ext in self.names:
                return os.path.join(self.img_path, image_id + ext)
        if self.by_stem is None:  # any other image extension: index by stem once
            self.by_stem = {}
            for name in sorted(self.names):
                if is_image_file(name):
                    self.by_stem.setdefault(os.path.splitext(name)[0], name)
        name = self.by_stem.get(image_id)
        return os.path.join(self.img_path, name) if name else None


def file_key(path) -> str:
    """One key per file however its path is written (`a.jpg`, `./a.jpg`, `x/../a.jpg`),
    without a system call per row (255k rows)."""
    return os.path.normcase(os.path.normpath(os.path.abspath(path)))


class SameFileCheck:
    """Rows of one CSV that name the same image file, however their ids are written
    (`demo00000`, `demo00000.jpg`, `./demo00000`): the second is an error naming both lines."""

    def __init__(self):
        self.first = {}

    def problem(self, line: int, image_id: str, path: str):
        first = self.first.setdefault(file_key(path), (line, image_id))
        if first[0] == line:
            return None
        if first[1] == image_id:
            return f"{line}, column 1: duplicate image id {show_cell(image_id)} (first on line {first[0]})"
        return (f"{line}, column 1: image {show_cell(image_id)} is the same file as {show_cell(first[1])} on line "
                f"{first[0]} ({path}); each image may appear once")


def shared_images(a: "LabelTable", b: "LabelTable") -> list:
    """The ids of `b` whose image file is also in `a` (in b's order)."""
    files = {file_key(p) for p in a.paths}
    return [image_id for image_id, path in zip(b.ids, b.paths) if file_key(path) in files]


# Column names of a mean opinion score (the quality data sets' label): a header holding
# one of them marks a MOS file, which trains with --label_format mos.
MOS_NAMES = {"mos", "dmos", "mean", "mean_score", "score", "mos_zscore", "quality", "rating"}
MOS_FLAGS = "--label_format mos --score_range LO HI (LO, HI: the lowest and highest score of its scale)"


def mos_header_hint(header: list) -> str:
    """A note on a header that names a MOS column, or ''."""
    named = [c for c in header if c.lower().replace(" ", "_") in MOS_NAMES]
    if not named:
        return ""
    return (f"the header names a mean opinion score column ({named[0]!r}): a file of image_id,mos[,std] rows is read "
            f"with {MOS_FLAGS}; python -m tools.iqa_to_csv writes one from the labels of KonIQ-10k, SPAQ, TID2013, "
            f"KADID-10k or LIVE in the Wild")


def expected_path(index: "ImageIndex", image_id: str) -> tuple:
    """(path, found) of an image id: the file it names, or where it is expected
    (<img_path>/<id>.jpg when the id has no image extension)."""
    path = index.resolve(image_id)
    if path is not None:
        return path, True
    return os.path.join(index.img_path, image_id if is_image_file(image_id) else image_id + ".jpg"), False


def row_image(index: "ImageIndex", image_id: str, line: int, require_images: bool, same_file: SameFileCheck,
              problems: list):
    """The image file of one row (None without an id), appending to `problems` a missing
    image (when required) and a file that an earlier row already named: the id-to-file
    rule and the duplicate check of every label reader."""
    if not image_id:
        return None
    path, found = expected_path(index, image_id)
    if not found and require_images:
        problems.append(f"{line}, column 1: image {show_cell(image_id)} not found in {index.img_path}")
    problems.extend(filter(None, [same_file.problem(line, image_id, path)]))
    return path


def checked_widths(csv_path, problems: list, rows: list, hint: str = "") -> set:
    """The end of every label reader: raise LabelFileError with all the file's problems
    (and `hint`), or for a file without data rows; else the set of how many values the
    rows carry."""
    if problems:
        raise LabelFileError(csv_path, problems, hint)
    if not rows:
        raise LabelFileError(csv_path, ["0: no data rows"])
    return {len(r[3]) for r in rows}


def width_problems(bad_widths: list, good_rows: int, header: list, require_labels: bool) -> tuple:
    """(the column-count problems of a 10-bin label file, a hint): the hint says how to
    train a MOS file when the rows look like one (mostly 2 or 3 columns: id, MOS[, std])
    or the header names a MOS column."""
    if not bad_widths:
        return [], ""
    valid = f"{NUM_BINS + 1}" if require_labels else f"1 (id only) or {NUM_BINS + 1}"
    problems = column_count_problems(bad_widths, f"{valid} (image id, then votes for ratings 1..10)")
    if sum(1 for _, w in bad_widths if w in (2, 3)) > (good_rows + len(bad_widths)) / 2:
        return problems, (f"rows of an image id and one or two numbers hold a mean opinion score (and its std): "
                          f"read the file with {MOS_FLAGS}")
    return problems, mos_header_hint(header)


def read_label_csv(csv_path, img_path, require_labels=True, require_images=True) -> LabelTable:
    """Read and validate a label CSV; raise LabelFileError listing every bad row.

    require_labels: every row must carry 10 ratings (training, validation).
    require_images: a row whose image is missing is an error; otherwise it is kept with
    its expected path, and the image loader reports it (inference writes errors.csv).
    """
    text = read_label_text(csv_path)
    index = ImageIndex(img_path)
    table, problems, rows, bad_widths, header = LabelTable(csv_path), [], [], [], []
    same_file = SameFileCheck()
    for row in label_rows(text, index, header):
        line, cells = row.first_line, row.cells
        if row.error:
            problems.append(f"{line}: cannot be parsed as CSV: {row.error}")
            continue
        row_problems = []
        if len(cells) not in (1, NUM_BINS + 1) or (require_labels and len(cells) != NUM_BINS + 1):
            bad_widths.append((line, len(cells)))
            continue
        image_id = cells[0]
        if not image_id:
            row_problems.append(f"{line}, column 1: empty image id")
        values = []
        for col, text_value in enumerate(cells[1:], start=2):
            value = parse_number(text_value)
            if value is None or not math.isfinite(value):
                row_problems.append(f"{line}, column {col}: {show_cell(text_value)} is not a finite number")
            elif value < 0:
                row_problems.append(f"{line}, column {col}: negative value {text_value[:40]}")
            values.append(value)
        if values and not row_problems:
            total = sum(values)
            if total <= 0:
                row_problems.append(f"{line}, columns 2-{NUM_BINS + 1}: all-zero distribution (no votes)")
            elif not math.isfinite(total):
                row_problems.append(f"{line}, columns 2-{NUM_BINS + 1}: the ratings add up to more than a float holds")
        path = row_image(index, image_id, line, require_images, same_file, row_problems)
        problems.extend(row_problems)
        if not row_problems:
            rows.append((image_id, path, line, values))
    bad, hint = width_problems(bad_widths, len(rows), header, require_labels)
    widths = checked_widths(csv_path, bad + problems, rows, hint)
    if len(widths) > 1:
        raise LabelFileError(csv_path, ["0: some rows have ratings and others do not; give all or none"])
    table.ids = [r[0] for r in rows]
    table.paths = [r[1] for r in rows]
    table.lines = [r[2] for r in rows]
    if widths == {NUM_BINS}:
        counts = np.asarray([r[3] for r in rows], dtype=np.float64)
        table.dists = (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)
    return table

