"""The end of a streaming scoring run: the part files (engine/score/parts.py) merged into the
prediction files of engine/score/predictions.py (predictions.csv sorted by image id, or in the
label CSV's order; each image once), predictions.parquet with --output_format parquet,
and the pictures, drawn from predictions.csv as written. An earlier run's files in the
folder are replaced only here, each atomically.

Ids: an image's id within its source (a path relative to its folder, a tar member's
key, a line of --file_list); an id that more than one source holds is prefixed with
its source's name (a shard's file name without .tar, a folder's name), and should two
still collide, the image's full reference (path, or SHARD:MEMBER) is its id.
"""
import io
import os
import tarfile
from array import array
from collections.abc import Mapping, Sequence

import numpy as np

from fileio import atomic_path, write_or_remove

from engine.score.parts import part_files, read_part
from engine.score.predictions import print_report, read_predictions, write_predictions



class Merged:
    """The merged results in output order: ids, refs, source indices, (N, 10) dists,
    label rows (`order`), errors [(ref, reason)] and warnings [(ref, text)]."""

    def __init__(self, sources):
        self.sources = sources
        self.refs, self.keys, self.source, self.order = [], [], array("i"), array("q")
        self.flat, self.warn, self.errors, self.duplicates = array("d"), {}, [], 0
        self.ids, self.dists = [], None

    def __len__(self):
        return len(self.refs)


def read_parts(folder, sources) -> Merged:
    """Every result in `folder`'s parts, each ref once (the first part holding it wins; a
    second copy is counted in `duplicates`), in output order with final ids."""
    m, seen, errors = Merged(sources), set(), []
    for path in part_files(folder):
        for ref, source, key, order, status, text, dist in read_part(path):
            if ref in seen:
                m.duplicates += 1
                continue
            seen.add(ref)
            if status != "ok":
                errors.append((order, ref, text))
                continue
            if text:
                m.warn[len(m.refs)] = text
            m.refs.append(ref)
            m.keys.append(key)
            m.source.append(source)
            m.order.append(order)
            m.flat.extend(dist)
    del seen
    table_mode = any(s.kind == "table" for s in sources)
    ids = list(m.keys) if table_mode else final_ids(m.keys, m.source, m.refs, [s.label for s in sources])
    rank = (sorted(range(len(ids)), key=m.order.__getitem__) if table_mode else sorted(range(len(ids)), key=ids.__getitem__))
    dists = np.frombuffer(m.flat, dtype=np.float64).reshape(-1, 10)[rank] if rank else np.zeros((0, 10))
    m.ids = [ids[i] for i in rank]
    m.refs, m.keys = [m.refs[i] for i in rank], None  # the keys live on in the ids
    m.source, m.order = array("i", (m.source[i] for i in rank)), array("q", (m.order[i] for i in rank))
    where = {old: new for new, old in enumerate(rank)}
    m.warn = sorted((where[i], text) for i, text in m.warn.items())
    m.flat, m.dists = None, dists
    m.errors = [(ref, text) for _, ref, text in sorted(errors, key=lambda e: (e[0], e[1]) if table_mode else (0, e[1]))]
    return m


def final_ids(keys, source, refs, labels) -> list:
    """Keys as ids, prefixed with their source's label where a key repeats across
    sources; the ref where that still collides."""
    first, repeated = {}, set()
    for key, s in zip(keys, source):
        if first.setdefault(key, labels[s]) != labels[s]:
            repeated.add(key)
    ids = [f"{labels[s]}/{key}" if key in repeated else key for key, s in zip(keys, source)]
    if len(set(ids)) < len(ids):
        count = {}
        for i in ids:
            count[i] = count.get(i, 0) + 1
        ids = [ref if count[i] > 1 else i for i, ref in zip(ids, refs)]
    return ids


class Openers(Sequence):
    """What load_rgb reads for each merged image, made when asked: the path of a file,
    the bytes of a tar member (read from its shard again; for the few pictures drawn)."""

    def __init__(self, refs, source, sources):
        self.refs, self.source, self.sources = refs, source, sources

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        source, ref = self.sources[self.source[i]], self.refs[i]
        if source.kind != "shard":
            return ref
        return member_bytes(source.spec, ref[len(source.spec) + 1:], ref)


class NamedBytes(io.BytesIO):
    """A tar member's bytes that print as SHARD:MEMBER in messages."""

    def __init__(self, data, ref):
        super().__init__(data)
        self.ref = ref

    def __repr__(self):
        return self.ref

    __str__ = __repr__


def member_bytes(shard, member, ref) -> NamedBytes:
    try:
        with tarfile.open(shard, "r:*") as tar:
            return NamedBytes(tar.extractfile(member).read(), ref)
    except (tarfile.TarError, OSError, KeyError, AttributeError, EOFError):
        return NamedBytes(b"", ref)  # read as a zero-byte image: the picture says unreadable


class OpenersById(Mapping):
    def __init__(self, ids, openers):
        self.index, self.openers = {i: n for n, i in enumerate(ids)}, openers

    def __getitem__(self, image_id):
        return self.openers[self.index[image_id]]

    def __iter__(self):
        return iter(self.index)

    def __len__(self):
        return len(self.index)


def write_parquet(csv_path, parquet_path) -> None:
    """predictions.parquet: predictions.csv's columns and values (the CSV's 6 decimals),
    image_id kept as text."""
    import pyarrow as pa
    from pyarrow import csv as pacsv
    from pyarrow import parquet as pq
    with open(csv_path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    types = {name: (pa.string() if name == "image_id" else pa.float64()) for name in header}
    table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp)


def merge_and_report(folder, sources, out_dir, model_args, *, table=None, score_range=None, output_format="csv",
                     contact_sheet=0, max_pixels=None, title=None, card=None):
    """Write the prediction files from the parts in `folder`, draw the pictures, print
    the report (its first line starting with `title` when given; card: the model card, as
    write_predictions'). Returns (ids, Openers, errors)."""
    m = read_parts(folder, sources)
    true = None
    if table is not None and table.dists is not None:
        true = np.asarray(table.dists)[np.asarray(m.order, dtype=np.int64)] if len(m) else np.zeros((0, 10))
    warned = [(m.refs[i], text) for i, text in m.warn]
    metrics = write_predictions(out_dir, m.ids, m.dists, true, m.errors, warned, model_args, score_range, card)
    written = ["pred.txt"]
    csv_path, parquet_path = os.path.join(out_dir, "predictions.csv"), os.path.join(out_dir, "predictions.parquet")
    if write_or_remove(parquet_path, output_format == "parquet", lambda p: write_parquet(csv_path, p)):
        written.append("predictions.parquet")
    m.dists = true = None  # the pictures read what was written
    from engine.plots import write_result_pictures  # matplotlib: imported only when pictures are drawn
    rows = read_predictions(csv_path)
    gt = np.array([r["gt_mean"] for r in rows]) if metrics else None
    openers = Openers(m.refs, m.source, sources)
    pictures = write_result_pictures(out_dir, openers, [r["image_id"] for r in rows], np.array([r["mean"] for r in rows]),
                                     gt, contact_sheet, max_pixels=max_pixels)
    print_report(out_dir, len(m), len(m) + len(m.errors), metrics, m.errors, warned, pictures, title, written)
    return m.ids, openers, m.errors
