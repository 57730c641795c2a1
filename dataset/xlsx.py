"""The rows of an .xlsx workbook's first worksheet, with the standard library: the format
is a zip of XML files (the shared strings, then one file per sheet). SPAQ publishes its
labels this way; reading them needs no spreadsheet package."""
import re
import zipfile
from xml.etree import ElementTree

from dataset.label_text import LabelFileError

_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"


def _column(ref: str, default: int) -> int:
    """0-based column of a cell reference such as 'B7' (default when it has none)."""
    letters = re.match(r"[A-Z]+", ref or "")
    if not letters:
        return default
    return sum((ord(ch) - 64) * 26 ** i for i, ch in enumerate(reversed(letters.group()))) - 1


def _cell_text(c, shared) -> str:
    v = c.find(_NS + "v")
    value = v.text if v is not None and v.text is not None else ""
    if c.get("t") == "s":  # an index into the shared strings
        return shared[int(value)] if value.isdigit() and int(value) < len(shared) else ""
    if c.get("t") == "inlineStr":
        return "".join(t.text or "" for t in c.iter(_NS + "t"))
    return value  # a number (as Excel wrote it), a formula's cached result, or a boolean


def xlsx_rows(path) -> list:
    """[(spreadsheet row number, cells as text)] of the first worksheet (sheet1.xml, the
    lowest-numbered), blank rows left out; LabelFileError when the file is no workbook."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            shared = []
            if "xl/sharedStrings.xml" in names:
                shared = ["".join(t.text or "" for t in si.iter(_NS + "t"))
                          for si in ElementTree.fromstring(z.read("xl/sharedStrings.xml")).iter(_NS + "si")]
            sheets = sorted((n for n in names if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", n)),
                            key=lambda n: int(re.findall(r"\d+", n)[0]))
            if not sheets:
                raise LabelFileError(path, ["0: no worksheet in the workbook (is it an .xlsx file?)"])
            sheet = ElementTree.fromstring(z.read(sheets[0]))
    except (zipfile.BadZipFile, ElementTree.ParseError, OSError) as exc:
        raise LabelFileError(path, [f"0: not a readable .xlsx workbook ({exc})"]) from None
    rows = []
    for row in sheet.iter(_NS + "row"):
        cells, col = {}, -1
        for c in row.iter(_NS + "c"):
            col = _column(c.get("r"), col + 1)
            cells[col] = _cell_text(c, shared).strip()
        number = row.get("r", "")
        if any(cells.values()):
            rows.append((int(number) if number.isdigit() else len(rows) + 1, [cells.get(i, "") for i in range(max(cells) + 1)]))
    return rows
