"""The text of a label file, before any meaning is given to it: its bytes read as UTF-8
(with or without a BOM; UTF-16 and other encodings reported), its lines (LF, CRLF or
CR), its cell separator, its rows and header, and the error that lists all of a file's
problems with their lines. dataset/labels.py (10-bin files), dataset/mos.py (mean
opinion scores) and the converters in tools/ read label files through it.
"""
import csv
import os
import re
from dataclasses import dataclass

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


def parse_number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value


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


def is_header(cells, index=None) -> bool:
    """A first row of column names, not data: no rating cell is a number, and the first
    cell names no image in `index` (a data row whose values are all bad or missing is
    reported, never dropped). `index`: the folder the ids name (dataset.labels.ImageIndex:
    resolve(id) gives a file or None), or None."""
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


def label_rows(text: str, index=None, header: list = None):
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
