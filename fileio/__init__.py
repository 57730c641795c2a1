"""Atomic file output, usable from every layer (model, dataset, engine, the CLIs and
tools): write beside the target, then rename, so no reader (and no crash) ever sees a
half-written file, and the previous version survives a failure."""
import json
import os
import tempfile
from contextlib import contextmanager


class OutputWriteError(OSError):
    pass


_UMASK = os.umask(0)  # read once at import: os.umask can only be read by setting it
os.umask(_UMASK)


@contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); give it open()'s mode
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before they become visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputWriteError(f"could not write {path}: {exc.strerror or exc} (the previous file, if any, is intact)") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def check_writable(folder) -> None:
    """Fail early (before hours of work) when `folder` cannot take new files."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputWriteError(f"cannot write into {folder}: {exc.strerror or exc}") from exc


def write_or_remove(path, wanted: bool, write) -> bool:
    """Call write(path) when `wanted`; otherwise remove the file an earlier run may have
    left there, so an output folder never mixes runs. Returns `wanted`."""
    if wanted:
        write(path)
    elif os.path.exists(path):
        os.remove(path)
    return bool(wanted)
