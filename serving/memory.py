"""Giving memory freed after a burst of uploads back to the system (glibc's malloc).

Two habits of glibc's malloc keep a server's memory at its peak after a burst. Blocks of
at least M_MMAP_THRESHOLD bytes get mappings of their own, unmapped when freed; but the
threshold rises to the size of any such block freed (up to 32 MiB), so the next
upload-sized buffers come from the heap, which is returned only from its top. And freed
chunks in the middle of the heap stay with the process until malloc_trim. So the
threshold is fixed at start-up, and the heap is trimmed when the service goes idle.
Elsewhere than glibc both are no-ops.
"""
import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3        # mallopt parameter, glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from rising
TRIM_DELAY_S = 0.5


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold (True when set)."""
    return _LIBC is not None and _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


class Trimmer:
    """Trims the heap (malloc_trim) half a second after the service goes idle: once per
    idle spell, never while requests are in progress (a trim of a large heap takes
    milliseconds)."""

    def __init__(self):
        self.active = 0
        self._pending = None

    def started(self) -> None:
        self.active += 1

    def finished(self, loop) -> None:
        self.active -= 1
        if self.active == 0 and self._pending is None and _LIBC is not None:
            self._pending = loop.call_later(TRIM_DELAY_S, self._trim)

    def _trim(self) -> None:
        self._pending = None
        if self.active == 0:
            _LIBC.malloc_trim(0)
