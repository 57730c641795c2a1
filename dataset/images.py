"""Reading images from disk as RGB, whatever their format and mode, and finding them."""
import glob
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from .decode_limits import DecodeTimeout, deadline, decode_cost_problem, decode_limits

# Pillow's own limit as shipped (it warns above it and refuses twice it): the default
# of --max_image_pixels. Read at import, before anything could have changed the global.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
IMAGE_EXTENSIONS = tuple(sorted({ext.lower() for ext in Image.registered_extensions()}))
# Tried in this order when a label CSV gives an id without an extension.
PREFERRED_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_REASON_CHARS = 200


class ImageReadError(Exception):
    """An image that cannot be used; the message says why (zero-byte, truncated, ...)."""


def _high_depth_top(mode: str, a: np.ndarray) -> float:
    """The value that becomes white. 16-bit data is scaled by 65535 whether Pillow opens it
    as I;16 or as I (Pillow before 11 opens 16-bit PNGs as I), so a dark 16-bit photo
    stays dark. I data beyond 16 bits and F data beyond [0, 1] have no fixed scale:
    their own maximum."""
    top = float(a.max(initial=0.0))
    if mode.startswith("I;16") or (mode == "I" and top <= 65535.0):
        return 65535.0
    return max(top, 1.0)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: scale to 8 bits instead of clipping everything above 255 to white.
        # float32, in place: a 16-bit image at the pixel limit stays under 400 MB here.
        a = np.nan_to_num(np.asarray(img).astype(np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        a /= _high_depth_top(img.mode, a)  # first: |a| / top cannot overflow, unlike a * 255
        np.clip(a, 0.0, 1.0, out=a)
        a *= 255.0
        img = Image.fromarray(np.rint(a, out=a).astype(np.uint8))  # rounded: 65535 * k / 255 is level k
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        # A palette's alpha, or a PNG's transparent colour (tRNS): composited below like an alpha channel.
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath: composite onto white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def check_max_pixels(max_pixels):
    """The pixel limit to apply: Pillow's default for None; raises ValueError otherwise."""
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"--max_image_pixels must be a whole number >= 1 (width x height), got {max_pixels!r}")
    return max_pixels


def _short(exc: BaseException) -> str:
    """'Type: message' on one line, cut to MAX_REASON_CHARS."""
    kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
    text = " ".join(str(exc).split())
    text = f"{kind}: {text}" if text else kind
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def _reason(exc: Exception, limit: int = DEFAULT_MAX_PIXELS) -> str:
    """The short reason an exception raised while reading an image gives (`limit`: the
    --max_image_pixels in force)."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own check, at twice its limit, which is >= ours
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return f"too large: {pixels.group(1) + ' pixels' if pixels else 'image'}, above --max_image_pixels {limit}"
    if isinstance(exc, (OSError, ValueError, SyntaxError)):  # Pillow's own messages say enough
        text = " ".join(str(exc).split())[:MAX_REASON_CHARS] or type(exc).__name__
        return "truncated image" if "truncated" in text.lower() else f"undecodable: {text}"
    return f"undecodable: {_short(exc)}"


def _remaining_bytes(source):
    """Bytes left to read in `source` (a path or a binary file object); None if unknown."""
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.path.getsize(source)
    try:
        here = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def _open_and(source, read, max_pixels=None, limits=None, full=False):
    """Open `source` (a path or a binary file object) and return (read(img), warning):
    every way a file can be unusable becomes an ImageReadError with a short reason
    (zero-byte, truncated, Type: message, ...), whatever the decoder raised. Python
    warnings raised meanwhile are caught, not printed: `warning` is their text ('' when
    none); the image is still used. `limits` (dataset.decode_limits; None: this
    process's) bound the time of it all, and for a `full` decode its work and memory,
    judged from the header before decoding."""
    limit = check_max_pixels(max_pixels)
    limits = limits or decode_limits()
    try:
        with deadline(limits.timeout_s):
            return _open_and_read(source, read, limit, limits, full)
    except DecodeTimeout:
        raise ImageReadError(f"decode took longer than --decode_timeout {limits.timeout_s:g} s") from None


def _open_and_read(source, read, limit, limits, full):
    # Pillow refuses images above twice its global limit while opening, before the check
    # below can see them: lift its limit to ours (never lowered, so that concurrent loads
    # with different limits cannot refuse each other's images); ours is applied here.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if _remaining_bytes(source) == 0:
                raise ImageReadError("zero-byte file")
            with Image.open(source) as img:
                width, height = img.size
                if width < 1 or height < 1:
                    raise ImageReadError(f"empty image: {width}x{height} pixels")
                if width * height > limit:
                    raise ImageReadError(f"too large: {width}x{height} = {width * height} pixels, above "
                                         f"--max_image_pixels {limit}")
                problem = decode_cost_problem(img, limits) if full else ""
                if problem:
                    raise ImageReadError(problem)
                result = read(img)
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is one unreadable image, never a lost run
            raise ImageReadError(_reason(exc, limit)) from None
    texts = dict.fromkeys(f"{w.category.__name__}: {' '.join(str(w.message).split())}" for w in caught)
    warning = "; ".join(texts)
    return result, (warning if len(warning) <= MAX_REASON_CHARS else warning[:MAX_REASON_CHARS - 3] + "...")


# The reduced image keeps a shorter side of at least DRAFT_MARGIN x the resize size, and at
# least DRAFT_MIN_SIDE pixels, so that the resize after it still shrinks by 2 or more and
# smooths the DCT scaling's blockier pixels. On the real photographs upscaled to 12
# megapixels, VGG16's crop moved by 0.20 grey levels on average against the exact decode
# (0.50 with no margin), for 4.6x less decode time than the exact path (6.3x with no
# margin); without the floor, the small inputs of tiny_cnn (resize 72) moved the demo
# model's scores beyond the bounds of tests/test_cpu_precision.py.
DRAFT_MARGIN = 2
DRAFT_MIN_SIDE = 512


def draft(img, draft_side) -> None:
    """Before decoding: let libjpeg decode `img` already reduced (DCT-domain scaling by 1/2,
    1/4 or 1/8), by the largest factor that keeps its shorter side at least
    max(DRAFT_MARGIN x `draft_side`, DRAFT_MIN_SIDE) (`draft_side`: the model's resize size,
    which the resize that follows reaches). Pillow picks the factor: s <= min(W, H) //
    side, so the reduced shorter side ceil(min(W, H) / s) stays >= side. No effect on
    other formats, on JPEGs under twice that side, on an image already decoded, or for None."""
    if draft_side:
        side = max(DRAFT_MARGIN * draft_side, DRAFT_MIN_SIDE)
        img.draft(None, (side, side))


def upright_rgb(img, draft_side=None) -> Image.Image:
    """A decoded image as the model sees it: EXIF orientation applied, any mode converted
    to RGB. The frame is the one the image is at: a freshly opened file is at its first
    frame (a PSD's is 1, not 0), and an ICO/ICNS opens at its largest size. With
    `draft_side`, a large JPEG is decoded reduced (see draft). Raises ImageReadError with
    a short reason, whatever failed. For files use load_rgb."""
    try:
        draft(img, draft_side)
        img.load()
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception as exc:  # noqa: BLE001 - damaged EXIF: the pixels are fine, keep them unrotated
            warnings.warn(f"EXIF orientation unreadable, image used as stored ({_short(exc)})")
            upright = img
        return _to_rgb(upright)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one unreadable image
        raise ImageReadError(_reason(exc)) from None


def check_resizable(size, shorter_side, max_pixels=None) -> None:
    """Raise ImageReadError when resizing an image of `size` (width, height) to
    `shorter_side` would exceed --max_image_pixels: a 1 x 100000 strip is small, but
    its resize to a 256-pixel shorter side is 25.6 million pixels wide."""
    limit = check_max_pixels(max_pixels)
    short, long = sorted(size)
    # The longer side as torchvision's Resize(int) computes it (truncated, not rounded up):
    # an image whose resize is exactly at the limit is allowed.
    resized = shorter_side * max(shorter_side, int(shorter_side * long / max(short, 1)))
    if resized > limit:
        raise ImageReadError(f"too elongated: {size[0]}x{size[1]} resized to a shorter side of {shorter_side} "
                             f"is {resized} pixels, above --max_image_pixels {limit}")


def _verified_size(img) -> tuple:
    size = img.size
    img.verify()
    return size


def read_rgb(source, max_pixels=None, limits=None, draft_side=None) -> tuple:
    """(RGB image, warning text) of `source`: load_rgb, plus the text of the decoder
    warnings it raised ('' when none)."""
    return _open_and(source, lambda img: upright_rgb(img, draft_side), max_pixels, limits, full=True)


def load_rgb(source, max_pixels=None, limits=None, draft_side=None) -> Image.Image:
    """Decode `source` (a path, or a binary file object such as an upload's BytesIO)
    fully, apply its EXIF orientation, return an RGB image.

    max_pixels: width x height above which an image is refused (--max_image_pixels);
    None is Pillow's default limit. limits: the decode's deadline, memory and scan
    bounds (dataset.decode_limits.DecodeLimits; None: this process's). draft_side: for
    scoring, the model's resize size: a large JPEG is decoded reduced, its shorter side
    kept >= max(2 x draft_side, 512) (see draft); None decodes at full size. Decoder
    warnings are swallowed (read_rgb returns them). Raises ImageReadError with a short
    reason for anything that cannot be used."""
    return _open_and(source, lambda img: upright_rgb(img, draft_side), max_pixels, limits, full=True)[0]


def header_size(source, max_pixels=None) -> tuple:
    """(width, height) as the header states it, nothing decoded or verified: the cheapest
    look. Raises ImageReadError like load_rgb."""
    return _open_and(source, lambda img: img.size, max_pixels)[0]


def read_image_size(path, max_pixels=None) -> tuple:
    """(width, height) from the file's header, after Pillow's structural check
    (Image.verify). Much cheaper than a full decode, but a JPEG cut short after its
    header passes: only load_rgb finds that. Raises ImageReadError like load_rgb."""
    return _open_and(path, _verified_size, max_pixels)[0]


def is_image_file(path) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def find_images(spec: str) -> tuple:
    """Expand one image, a folder (recursively) or a glob into (root, sorted paths).

    `root` is what image ids are made relative to."""
    if os.path.isdir(spec):
        root = spec
        paths = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files if is_image_file(f)]
    elif os.path.isfile(spec):
        root, paths = os.path.dirname(spec), [spec]
    else:
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and is_image_file(p)]
        root = _glob_root(spec)
    return root, sorted(paths)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = []
    for part in pattern.split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or "."
