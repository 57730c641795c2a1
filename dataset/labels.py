"""Label CSVs (README, "Formats"): one row per image, the id then 10 numbers for ratings 1..10.

The numbers may be vote counts or probabilities; each row is normalised to sum 1.
A header row is recognised (its rating cells are not numbers and its first cell names no
image) and skipped; every other row is kept or reported. All problems of a file are reported together, each
with its line and column, before any training starts. Whatever bytes the file holds,
the result is a valid table or a LabelFileError: UTF-8 with or without a BOM, and
LF, CRLF or CR line ends are read; UTF-16 and other encodings are reported.

label_rows() is the one row parser: read_label_csv and tools/check_images.py use it.
"""
import csv
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from model.constants import NUM_BINS

from .images import PREFERRED_EXTENSIONS, is_image_file

MAX_PROBLEMS_SHOWN = 30


class LabelFileError(ValueError):
    """The problems of a label file, each "LINE: ...", "LINE, column C: ..." or, for the
    file as a whole, "0: ..." (shown without a line number); `hint`, when given, says once
    what the problems suggest (e.g. the flags that read the file as it is)."""

    def __init__(self, csv_path, problems, hint: str = ""):
        self.csv_path, self.problems, self.hint = csv_path, problems, hint
        if len(problems) == 1 and problems[0].startswith("0: "):
            message = f"{csv_path}: {problems[0][3:]}"
        else:
            shown = "\n".join(f"  {csv_path}" + (f": {p[3:]}" if p.startswith("0: ") else f":{p}")
                              for p in problems[:MAX_PROBLEMS_SHOWN])
            more = len(problems) - MAX_PROBLEMS_SHOWN
            if more > 0:
                shown += f"\n  ... and {more} more"
            message = f"{csv_path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n{shown}"
        super().__init__(message + (f"\nhint: {hint}" if hint else ""))


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


def parse_number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value


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


def show_cell(text: str, width: int = 40) -> str:
    """repr of a cell, cut short: a problem list stays readable whatever the file holds."""
    return repr(text) if len(text) <= width else repr(text[:width]) + f"... ({len(text)} characters)"


def split_lines(data):
    """Lines of `data` (str or bytes) with their ends, split at LF, CRLF or CR: the lines
    the csv module counts, so that its line numbers index this list (from 1)."""
    pattern = r"(?<=\n)|(?<=\r)(?!\n)"
    parts = re.split(pattern.encode() if isinstance(data, bytes) else pattern, data)
    return parts[:-1] if parts and not parts[-1] else parts


def read_label_text(csv_path) -> str:
    """The text of a label CSV; raises LabelFileError (line 0 for the file, else the line
    of the first byte that is not UTF-8)."""
    if not os.path.isfile(csv_path):
        raise LabelFileError(csv_path, ["0: no such file"])
    try:
        with open(csv_path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LabelFileError(csv_path, [f"0: cannot read the file: {exc.strerror or exc}"]) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LabelFileError(csv_path, ["1: the file is UTF-16 text; save it as UTF-8 (or plain ASCII)"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = len(split_lines(data[:exc.start] + b"x"))
        raise LabelFileError(csv_path, [f"{line}: byte {data[exc.start]:#04x} is not UTF-8 text; save the file as UTF-8"]) from None


def is_header(cells, index: "ImageIndex" = None) -> bool:
    """A first row of column names, not data: no rating cell is a number, and the first
    cell names no image in `index` (a data row whose values are all bad or missing is
    reported, never dropped)."""
    if len(cells) < 2 or not all(parse_number(c) is None for c in cells[1:]):
        return False
    return index is None or not cells[0] or index.resolve(cells[0]) is None


@dataclass
class LabelRow:
    first_line: int   # 1-based; a quoted cell may span lines
    last_line: int
    cells: list       # stripped cells; empty when `error` is set
    error: str = ""   # the csv module's complaint (a cell over its size limit, ...)


DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}
# A number written with a decimal comma, as spreadsheets in many locales save it in
# semicolon- or tab-separated files: 3,5 for 3.5.
DECIMAL_COMMA = re.compile(r"[+-]?[0-9]*,[0-9]+(?:[eE][+-]?[0-9]+)?")


def sniff_delimiter(text: str) -> str:
    """The cell separator of a label file, from its first non-blank line: a comma, or a
    semicolon or tab when the line holds more of those than commas (a spreadsheet's
    "CSV" in many locales: `id;3,5;0,8` is two numbers with decimal commas)."""
    first = next((line for line in split_lines(text) if line.strip()), "")
    counts = {d: first.count(d) for d in DELIMITERS}
    best = max((";", "\t"), key=lambda d: counts[d])
    return best if counts[best] > 0 and counts[best] >= counts[","] else ","


def label_rows(text: str, index: "ImageIndex" = None, header: list = None):
    """LabelRows of a label CSV's text, skipping blank lines and a header row (is_header,
    with `index` the folder its ids name; its cells are appended to `header` when a list
    is given). Comma-, semicolon- and
    tab-separated files are read alike (sniff_delimiter); in the last two a number's
    decimal comma is read as a point."""
    delimiter = sniff_delimiter(text)
    reader = csv.reader(split_lines(text), delimiter=delimiter)
    previous, first = 0, True
    while True:
        try:
            cells = next(reader)
            error = ""
        except StopIteration:
            return
        except csv.Error as exc:
            cells, error = [], str(exc)
        start, previous = previous + 1, reader.line_num
        cells = [c.strip() for c in cells]
        if delimiter != ",":
            cells[1:] = [c.replace(",", ".") if DECIMAL_COMMA.fullmatch(c) else c for c in cells[1:]]
        if not error and (not cells or all(c == "" for c in cells)):
            continue
        if first and not error:
            first = False
            if is_header(cells, index):
                if header is not None:
                    header.extend(cells)
                continue
        first = False
        yield LabelRow(start, previous, cells, error)


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


def column_count_problems(bad: list, expected: str, hints: dict = None) -> list:
    """One problem per column count that rows have in error, not one per row: `bad` is
    [(line, number of columns)], `expected` what a row should hold, `hints` a note for
    a count (e.g. what a file with that many columns is)."""
    problems = []
    for width in sorted({w for _, w in bad}, key=lambda w: min(line for line, n in bad if n == w)):
        lines = [line for line, n in bad if n == width]
        more = ""
        if len(lines) > 1:
            shown = ", ".join(str(line) for line in lines[1:6]) + (", ..." if len(lines) > 6 else "")
            more = f"; so do {len(lines) - 1} more row{'s' if len(lines) > 2 else ''} (line{'s' if len(lines) > 2 else ''} {shown})"
        hint = (hints or {}).get(width, "")
        problems.append(f"{lines[0]}: has {width} column{'s' if width != 1 else ''}, expected {expected}{more}"
                        + (f"; {hint}" if hint else ""))
    return problems


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

