"""Bounds on the work and memory of decoding one image, checked from its header before
anything is decoded, and a deadline on the decode itself. dataset.images applies them
to every full decode (training, test.py, tools.check_images, the service's decoders).

Why each bound exists:
  scans     A progressive JPEG is decoded in scans, and each scan walks every block of
            the image; an end-of-band run codes a whole empty scan in a few bytes. So a
            1.85 MB file of 10,000 scans of 89 megapixels keeps a decoder busy for over a
            minute. Encoders write 6 to 10 scans (libjpeg's standard progression), rarely
            more than a few dozen. At the bound, 100 empty scans of 89 megapixels cost
            about what decoding a real 10-scan progressive JPEG of that size does (2.8 s
            and 3.5 s on one busy core), so a file at the bound is no worse than a
            legitimate one of its size.
  memory    Pillow refuses images over its pixel limit, but the memory a decode needs
            also depends on the mode: a 16-bit RGBA PNG just under the limit took about
            2 GB. The estimate is width x height x the peak bytes per pixel of
            load_rgb for the mode (table below), checked against --max_decode_mb.
  deadline  Anything else slow (an odd codec path, a slow disk) is cut at
            --decode_timeout seconds: a SIGALRM timer in the decoding process, which
            Pillow's decode loop notices between chunks of input (64 KiB). It needs the
            process's main thread (DataLoader workers, test.py/main.py, the service's
            decoding processes, tools.check_images' pool all are); elsewhere no deadline
            is set. The service also kills a decoding process that overruns it.

The limits are process-wide (set once by a CLI from its flags, set_decode_limits) and
travel with the objects that decode in other processes (ImageDataset keeps the limits it
was made with), so forked and spawned workers apply the same ones.
"""
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

MAX_JPEG_SCANS = 100
DEFAULT_DECODE_TIMEOUT_S = 10.0
# 1 GiB: an RGB image at Pillow's pixel limit (89,478,485 x 12 bytes) just fits.
DEFAULT_MAX_DECODE_MB = 1024.0
MIB = 1024 * 1024

# Peak bytes per pixel of load_rgb plus the model's resize, by the mode Pillow opens an
# image in: the decoded image in Pillow's layout (4 bytes a pixel for every multi-band
# mode, 1 for L, P and 1, 2 for 16-bit grey) and the copies the conversion to RGB makes
# (EXIF transpose, convert; transparency composited on white takes three more RGBA
# images). Measured as the peak RSS growth of load_rgb on 9-megapixel images of each
# mode (Pillow 13): RGB, CMYK and YCbCr 12.0-12.1; RGBA and LA 24.0; P 18.0; L and 1
# 6.0-6.1; I;16 13.1; I and F 17.1.
PEAK_BYTES_PER_PIXEL = {
    "1": 6, "L": 6, "P": 18,
    "I;16": 13, "I;16L": 13, "I;16B": 13, "I;16N": 13, "I": 17, "F": 17,
    "RGB": 12, "RGBX": 12, "CMYK": 12, "YCbCr": 12, "LAB": 12, "HSV": 12,
    "RGBA": 24, "RGBa": 24, "LA": 24, "La": 24, "PA": 24,
}
UNKNOWN_MODE_BYTES_PER_PIXEL = 24  # the largest above: an unlisted mode is not assumed cheap
# The WebP decoder holds its own full-size RGB(A) buffer beside Pillow's (measured: RGB
# 20.1, RGBA 32.1 bytes a pixel).
FORMAT_EXTRA_BYTES_PER_PIXEL = {"WEBP": 8}

# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed zero, a
# restart marker (RST0-7) or another 0xFF (fill).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)


@dataclass(frozen=True)
class DecodeLimits:
    timeout_s: float = DEFAULT_DECODE_TIMEOUT_S   # --decode_timeout; 0: no deadline
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB  # --max_decode_mb

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * MIB)


_process_limits = DecodeLimits()


def check_decode_limits(timeout_s, max_decode_mb) -> DecodeLimits:
    """The limits for these flag values; raises ValueError naming the flag."""
    if not timeout_s >= 0:
        raise ValueError(f"--decode_timeout must be >= 0 seconds (0: no deadline), got {timeout_s:g}")
    if not max_decode_mb > 0:
        raise ValueError(f"--max_decode_mb must be > 0, got {max_decode_mb:g}")
    return DecodeLimits(float(timeout_s), float(max_decode_mb))


def set_decode_limits(timeout_s=DEFAULT_DECODE_TIMEOUT_S, max_decode_mb=DEFAULT_MAX_DECODE_MB) -> DecodeLimits:
    """Make these the limits of every decode in this process (and in workers it forks
    from now on); raises ValueError naming the flag. Returns them."""
    global _process_limits
    _process_limits = check_decode_limits(timeout_s, max_decode_mb)
    return _process_limits


def decode_limits() -> DecodeLimits:
    return _process_limits


def jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS + 1) -> int:
    """Start-of-scan markers of the first image in a JPEG file's bytes (up to its
    end-of-image marker), counting no further than `stop_after`. Walks the marker
    segments by their lengths and searches the entropy-coded data between them: no
    decoding."""
    n, pos, scans = len(data), 2, 0
    while pos + 4 <= n and scans < stop_after:
        if data[pos] != 0xFF:  # entropy-coded data (or junk): on to the next marker
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:  # end of image
            break
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart markers, TEM: no length
            pos += 2
        else:
            scans += marker == 0xDA
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return scans


def is_progressive_jpeg(img) -> bool:
    return img.format in ("JPEG", "MPO") and bool(img.info.get("progressive") or img.info.get("progression"))


def whole_file(img) -> bytes:
    """The bytes of an opened image's file (Pillow reads a JPEG from offset 0 of its
    file object), leaving the file where it was."""
    fp = img.fp
    here = fp.tell()
    try:
        fp.seek(0)
        return fp.read()
    finally:
        fp.seek(here)


def decode_bytes(img) -> int:
    """The estimated peak memory (bytes) of decoding `img` (opened, not loaded) to RGB."""
    per_pixel = PEAK_BYTES_PER_PIXEL.get(img.mode, UNKNOWN_MODE_BYTES_PER_PIXEL)
    per_pixel += FORMAT_EXTRA_BYTES_PER_PIXEL.get(img.format, 0)
    width, height = img.size
    return width * height * per_pixel


def decode_cost_problem(img, limits: DecodeLimits = None, data: bytes = None) -> str:
    """Why decoding `img` (opened from its header, not loaded) would cost too much, or ''
    when it is within the limits. `data`: the file's bytes when the caller has them."""
    limits = limits or _process_limits
    need = decode_bytes(img)
    if need > limits.max_decode_bytes:
        width, height = img.size
        return (f"too large to decode: {width}x{height} {img.mode} needs about {need / MIB:.0f} MiB "
                f"({PEAK_BYTES_PER_PIXEL.get(img.mode, UNKNOWN_MODE_BYTES_PER_PIXEL)} bytes a pixel), "
                f"above --max_decode_mb {limits.max_decode_mb:g}")
    if is_progressive_jpeg(img):
        scans = jpeg_scans(data if data is not None else whole_file(img))
        if scans > MAX_JPEG_SCANS:
            return (f"too many scans: a progressive JPEG of more than {MAX_JPEG_SCANS} scans (each one walks the "
                    f"whole image; real encoders write about 10), refused before decoding")
    return ""


class DecodeTimeout(BaseException):
    """Raised inside a decode when its deadline passes. A BaseException, like
    KeyboardInterrupt, so that the broad `except Exception` of decoders and of our own
    per-image error handling cannot swallow it."""


def _on_alarm(_signum, _frame):
    raise DecodeTimeout()


@contextmanager
def deadline(seconds: float):
    """Raise DecodeTimeout in the body if it runs longer than `seconds` (0: never).
    Needs the main thread of the process and no other interval timer running; where
    either is missing, the body runs without a deadline."""
    usable = (seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        # Disarm first: a signal that arrives in between finds our handler (raised here,
        # caught by the caller), never the default one (which would end the process).
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
