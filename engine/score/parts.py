"""The part files of a streaming scoring run (test.py): results are written as they come,
a few thousand images per file, each file written atomically (a kill leaves whole parts
or none), so a run stopped at any moment loses only the images it had not yet written,
and `--resume` skips every image some part already holds.

<predictions>/parts/ (removed after the final merge unless test.py --keep_parts) holds
- run.json: what the results depend on (model file, preprocessing, sources, TTA, pixel
  limit); a resume with another record would mix two runs' scores, and is refused;
- part-r<rank>-<token>-<seq>.csv: columns ref, source, key, order, status (ok or
  error), text (the decoder's warning, or why the image is unreadable), p1..p10 (the
  predicted distribution, written exactly: repr of each float). <token> is drawn per
  process, so a rerun with another number of processes never overwrites a part.
"""
import csv
import glob
import io
import json
import os
import secrets
import shutil

from fileio import atomic_write_json, atomic_write_text

PARTS_DIR = "parts"
PART_SIZE = 5000  # images per part file (test.py --part_size): what a kill can lose at most
RUN_RECORD = "run.json"
PART_GLOB = "part-*.csv"
COLUMNS = ["ref", "source", "key", "order", "status", "text"] + [f"p{k}" for k in range(1, 11)]
FORMAT_VERSION = 1


class PartsResumeError(ValueError):
    """--resume over parts another run wrote (other model, inputs or preprocessing)."""


def parts_dir(out_dir) -> str:
    return os.path.join(out_dir, PARTS_DIR)


def new_token() -> str:
    return secrets.token_hex(4)


def part_path(folder, rank: int, token: str, seq: int) -> str:
    return os.path.join(folder, f"part-r{rank:05d}-{token}-{seq:06d}.csv")


def write_part(path, rows) -> None:
    """rows: (ref, source, key, order, status, text, distribution or None)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for ref, source, key, order, status, text, dist in rows:
        w.writerow([ref, source, key, order, status, text] + ([repr(float(p)) for p in dist] if dist is not None else [""] * 10))
    atomic_write_text(path, buf.getvalue())


def part_files(folder) -> list:
    return sorted(glob.glob(os.path.join(glob.escape(folder), PART_GLOB)))


def read_part(path):
    """The rows of one part: (ref, source, key, order, status, text, [10 floats] or None)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != COLUMNS:
            raise PartsResumeError(f"{path}: not a part file of this version (header {header!r}); remove {os.path.dirname(path)} "
                              f"or score without --resume")
        for row in reader:
            ref, source, key, order, status, text = row[:6]
            yield ref, int(source), key, int(order), status, text, ([float(p) for p in row[6:16]] if status == "ok" else None)


def done_refs(folder):
    """(ref, source index) of every item some part of `folder` holds."""
    for path in part_files(folder):
        for row in read_part(path):
            yield row[0], row[1]


def run_record(model_path, model_args, sources, tta, max_pixels, rt) -> dict:
    """What the scores of a run depend on; two runs with the same record can share parts.
    The precision (bf16 or float32) and the decoder (Pillow with or without JPEG draft,
    or the device's) move scores in the third decimal: a resume under others would mix
    two sets of numbers in one file."""
    st = os.stat(model_path)
    return {"format_version": FORMAT_VERSION,
            "model": {"path": os.path.abspath(model_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            "model_args": {k: v for k, v in sorted(dict(model_args).items())},
            "sources": [s.describe() for s in sources], "tta": tta, "max_image_pixels": max_pixels,
            "precision": "bf16" if rt.amp else "float32",
            "decode": "device" if rt.gpu_decode else ("pillow_draft" if rt.jpeg_draft else "pillow_exact")}


def prepare(folder, record: dict, resume: bool) -> str:
    """Make `folder` ready for this run's parts (rank 0, before any process writes one).
    A fresh run removes an earlier run's parts; a resume keeps them when their run.json
    equals `record` and raises PartsResumeError, naming what differs, when not. Temporary
    files of writes a kill interrupted are removed. Returns a line for the terminal
    ('' when there is nothing to say)."""
    os.makedirs(folder, exist_ok=True)
    for tmp in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
        os.remove(tmp)
    record_path = os.path.join(folder, RUN_RECORD)
    parts = part_files(folder)
    note = ""
    if resume and os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            old = json.load(f)
        json_record = json.loads(json.dumps(record))  # tuples -> lists, as read back
        if old != json_record:
            differ = sorted(k for k in set(old) | set(json_record) if old.get(k) != json_record.get(k))
            raise PartsResumeError(f"--resume: the parts in {folder} come from another run (different {', '.join(differ)}); "
                              f"rerun with that run's flags and inputs, or without --resume to start over")
        note = f"resuming: {len(parts)} part file{'s' if len(parts) != 1 else ''} in {folder} already scored; their images are skipped"
    else:
        if resume:
            note = f"--resume: no earlier run in {folder}; scoring everything"
        for path in parts:
            os.remove(path)
    atomic_write_json(record_path, record)
    return note


def remove_parts(folder) -> None:
    """After a successful merge: the prediction files hold everything the parts did."""
    shutil.rmtree(folder, ignore_errors=True)
