"""Where the images of a scoring run come from, read lazily: nothing is listed ahead, so
the first images are scored while a folder of a million files is still being walked,
and memory does not grow with the collection.

A source is one of (test.py --test_images SPEC..., --file_list, --test_csv):
- file: one image; its id is its file name;
- folder: every image below it (recursive, os.scandir); ids are paths relative to it;
- glob: a quoted pattern; ids are relative to the folder before its first wildcard;
- list: --file_list, one path per line (relative ones from the list's folder); the id is
  the line as written;
- shard: a tar file in the WebDataset layout (samples as members named KEY.EXT, read in
  tarfile's streaming mode, nothing extracted); the id is the member's key, its name up
  to the first dot of its last path component;
- table: the rows of a label CSV; ids as written there, in the CSV's order.

Each source yields Entry values. `ref` names an item across runs and in errors.csv (a
file's path, or SHARD:MEMBER); an entry whose `error` is set could not even be reached
(a missing shard, a damaged tar, an unlistable folder) and is reported, never raised.
"""
import glob
import itertools
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import NamedTuple

from .images import _glob_root, is_image_file

SHARD_SUFFIX = ".tar"
TAR_BLOCK = 512
TAR_END_BYTES = 2 * TAR_BLOCK          # the end-of-archive marker: two zero blocks
MAX_MEMBER_BYTES = 512 * 1024 * 1024   # a member above this is refused, not read into memory
_BRACE = re.compile(r"\{([^{}]*)\}")


class Entry(NamedTuple):
    ref: str          # path, or SHARD:MEMBER; what errors.csv names
    key: str          # the id within its source ('' for an entry that is not one image)
    data: object      # a path to read, the member's bytes, or None with an error
    error: str = ""   # why the entry cannot be read, '' when it can be tried
    order: int = -1   # the row of a label CSV, -1 elsewhere


@dataclass
class Source:
    kind: str                 # file, folder, glob, list, shard, table
    spec: str                 # as given (a path or a pattern)
    root: str = ""            # ids are relative to it (folder, glob)
    label: str = ""           # prefixes ids that repeat across sources
    table: object = field(default=None, repr=False)   # the LabelTable of a table source

    def describe(self) -> dict:
        """What identifies this source in a resumable run's record (run.json)."""
        out = {"kind": self.kind, "spec": os.path.abspath(self.spec)}
        if self.kind in ("list", "table"):  # edited since: not the same work
            st = os.stat(self.spec)
            out.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return out


def expand_braces(spec: str) -> list:
    """'shards/{000000..000999}.tar' -> 1000 names (zero padding kept: the width of the
    first bound when it starts with 0); '{a,b}' lists; several groups multiply. A spec
    without a range or list in braces is returned as it is."""
    groups = [m for m in _BRACE.finditer(spec) if ".." in m.group(1) or "," in m.group(1)]
    if not groups:
        return [spec]
    choices = []
    for m in groups:
        body = m.group(1)
        if "," in body:
            choices.append(body.split(","))
            continue
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
            raise ValueError(f"--test_images {spec!r}: bad brace range {{{body}}}: expected {{FIRST..LAST}} with "
                             f"whole numbers FIRST <= LAST (as in {{000000..000999}}) or a list {{a,b,c}}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        choices.append([str(n).zfill(width) for n in range(int(lo), int(hi) + 1)])
    pieces, last = [], 0
    for m in groups:
        pieces.append(spec[last:m.start()])
        last = m.end()
    tail = spec[last:]
    return ["".join(p + c for p, c in zip(pieces, combo)) + tail for combo in itertools.product(*choices)]


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIX)


def _label(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return name[:-len(SHARD_SUFFIX)] if is_shard(name) else name


def resolve_specs(specs, file_list=None) -> list:
    """Sources for --test_images SPEC... and --file_list. Raises ValueError, naming the
    spec, for one that names nothing (no such path, an empty folder or glob, a brace
    range none of whose names exist); a missing shard within a range is only reported."""
    sources = []
    for spec in specs or ():
        names = expand_braces(spec)
        if len(names) > 1 or names[0] != spec:
            if not any(os.path.exists(n) for n in names):
                raise ValueError(f"--test_images {spec!r}: none of its {len(names)} names exists (first: {names[0]})")
            sources += [Source("folder" if os.path.isdir(n) else "shard" if is_shard(n) else "file", n,
                               n if os.path.isdir(n) else os.path.dirname(n), _label(n)) for n in names]
        elif os.path.isdir(spec):
            sources.append(_nonempty(Source("folder", spec, spec, _label(spec))))
        elif os.path.isfile(spec):
            sources.append(Source("shard" if is_shard(spec) else "file", spec, os.path.dirname(spec), _label(spec)))
        elif glob.has_magic(spec) and is_shard(spec):
            shards = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not shards:
                raise ValueError(f"--test_images {spec!r}: no tar shard matches")
            sources += [Source("shard", p, os.path.dirname(p), _label(p)) for p in shards]
        elif glob.has_magic(spec):
            sources.append(_nonempty(Source("glob", spec, _glob_root(spec), spec)))
        else:
            raise ValueError(f"--test_images {spec}: no such file or folder (give an image, a folder, a quoted glob, "
                             f"a tar shard or a brace range of shards such as 'shards/{{000000..000009}}.tar')")
    if file_list:
        if not os.path.isfile(file_list):
            raise ValueError(f"--file_list {file_list}: no such file (expected a text file with one image path per line)")
        source = Source("list", file_list, os.path.dirname(file_list), _label(file_list))
        if next(iter_entries(source), None) is None:
            raise ValueError(f"--file_list {file_list}: no entries (one image path per line; blank lines and lines "
                             f"starting with # are skipped)")
        sources.append(source)
    return sources


def table_source(table) -> Source:
    """The rows of a label CSV (a LabelTable) as a source."""
    return Source("table", table.csv_path, "", _label(table.csv_path), table)


def _nonempty(source: Source) -> Source:
    if next(iter_entries(source), None) is None:  # stops at the first image: instant on a huge folder
        raise ValueError(f"--test_images {source.spec!r}: no image files found (looked for {', '.join(('.jpg', '.png', '.webp', '...'))})")
    return source


def iter_entries(source: Source, wanted=lambda ref: True):
    """The entries of `source`; `wanted(ref)` is asked before an image's bytes are read,
    so a worker skips (but never reads) the other workers' tar members."""
    if source.kind == "shard":
        yield from _shard_entries(source.spec, wanted)
        return
    if source.kind == "table":
        t = source.table
        yield from (Entry(p, i, p, order=n) for n, (i, p) in enumerate(zip(t.ids, t.paths)) if wanted(p))
        return
    for ref, key, error in _file_entries(source):
        if wanted(ref):
            yield Entry(ref, key, None if error else ref, error)


def _file_entries(source: Source):
    """(path, id, error) of a file, folder, glob or list source."""
    if source.kind == "file":
        yield source.spec, os.path.basename(source.spec), ""
    elif source.kind == "folder":
        yield from walk_images(source.spec)
    elif source.kind == "glob":
        for path in glob.iglob(source.spec, recursive=True):
            if is_image_file(path) and os.path.isfile(path):
                yield path, os.path.relpath(path, source.root), ""
    elif source.kind == "list":
        with open(source.spec, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield (entry if os.path.isabs(entry) else os.path.join(source.root, entry)), entry, ""
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")


def walk_images(root: str):
    """(path, path relative to root, '') of every image file below `root`, depth first,
    each folder's entries in the order the file system gives them; (folder, '', reason)
    for a folder that cannot be listed. Symbolic links to folders are not followed (as
    os.walk)."""
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                subfolders = []
                for e in it:
                    try:
                        if e.is_dir():
                            if not e.is_symlink():
                                subfolders.append((e.path, rel + e.name + os.sep))
                        elif is_image_file(e.name):
                            yield e.path, rel + e.name, ""
                    except OSError:  # vanished meanwhile
                        continue
        except OSError as exc:
            yield folder, "", f"cannot list folder: {exc.strerror or exc}"
            continue
        stack.extend(reversed(subfolders))


def member_key(name: str) -> str:
    """A WebDataset sample key: the member's name up to the first dot of its last path
    component ('a/b.c.jpg' -> 'a/b')."""
    folder, base = os.path.split(name)
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _shard_entries(shard: str, wanted):
    """The image members of one tar shard, in their order. A damaged or truncated shard
    yields every complete member before the damage, then one error entry for the shard
    naming the member where it broke. Whichever worker reads which member, the entries
    (and the error's text) are the same: a member skipped unread fails where a read one
    would."""
    seen, whole, pending, current = {}, 0, 0, None
    try:
        f = open(shard, "rb", buffering=1 << 20)
    except OSError as exc:
        if wanted(shard):
            yield Entry(shard, "", None, f"cannot open tar shard: {exc.strerror or exc}")
        return
    with f:
        end = 0
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    # Reaching this header means the previous member's data was all there.
                    whole, pending, current = whole + pending, 0, member.name
                    if not member.isfile() or not is_image_file(member.name):
                        end = _member_end(member)
                        continue  # the sample's other files (.json, .cls, ...)
                    ref, key = f"{shard}:{member.name}", member_key(member.name)
                    entry = None
                    if key in seen:
                        entry = Entry(ref, "", None, f"duplicate key {key!r} in tar shard (also member {seen[key]})")
                    elif wanted(ref):
                        entry = (Entry(ref, key, tar.extractfile(member).read()) if member.size <= MAX_MEMBER_BYTES else
                                 Entry(ref, key, None, f"tar member of {member.size} bytes, above {MAX_MEMBER_BYTES}"))
                    seen.setdefault(key, member.name)
                    end, pending = _member_end(member), 1
                    if entry is not None and wanted(ref):
                        yield entry
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # zlib's errors are OSError/EOFError
            where = f"in or after member {current}" if current else "before its first member"
            if wanted(shard):
                yield Entry(shard, "", None, f"damaged or truncated tar shard {where} ({whole} image members before it "
                                             f"read whole; the rest is lost): {type(exc).__name__}: {exc}"[:300])
            return
        whole += pending
        tail = _end_marker_problem(f, end)
        if tail and wanted(shard):
            where = f"after member {current}" if current else "before its first member"
            yield Entry(shard, "", None, f"truncated tar shard {where} ({whole} image members read whole): {tail}; "
                                         f"any later members are lost")


def _member_end(member) -> int:
    return member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK


def _end_marker_problem(f, end: int) -> str:
    """'' when an uncompressed tar has its end-of-archive marker after its last member
    (ending at byte `end`), else what is wrong. tarfile's streaming mode ends quietly at a
    file cut on a block boundary or inside a header; this is how such a cut shows."""
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return ""  # compressed: the decompressor has checked the stream's end
        f.seek(end)
        marker = f.read(TAR_END_BYTES)
    except OSError as exc:
        return f"cannot check the end of the file: {exc.strerror or exc}"
    if size - end < TAR_END_BYTES or marker.strip(b"\0"):
        return f"no end-of-archive marker ({size - end} bytes after the last complete member)"
    return ""
