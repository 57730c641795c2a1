"""Reading images from disk as RGB, whatever their format and mode, and finding them."""
import glob
import os

import numpy as np
from PIL import Image, ImageOps

# Pillow refuses images above ~179 Mpx as a "decompression bomb"; AVA has none that large.
IMAGE_EXTENSIONS = tuple(sorted({ext.lower() for ext in Image.registered_extensions()}))
# Tried in this order when a label CSV gives an id without an extension.
PREFERRED_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageReadError(Exception):
    """An image that cannot be used; the message says why (zero-byte, truncated, ...)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: scale to 8 bits instead of clipping everything above 255 to white.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath: composite onto white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _open_and(path, read):
    """Open `path` and return read(img); every way a file can be unusable becomes an
    ImageReadError with a short reason (zero-byte, truncated, ...)."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError("zero-byte file")
        with Image.open(path) as img:
            return read(img)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not an image Pillow can identify") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"too large: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        text = str(exc)
        raise ImageReadError("truncated image" if "truncated" in text else f"undecodable: {text}") from None


def upright_rgb(img) -> Image.Image:
    """A decoded image as the model sees it: first frame, EXIF orientation applied, any
    mode converted to RGB. For files use load_rgb, which also maps failures to reasons."""
    img.seek(0)  # first frame of GIF/TIFF stacks
    img.load()
    return _to_rgb(ImageOps.exif_transpose(img))


def _verified_size(img) -> tuple:
    size = img.size
    img.verify()
    return size


def load_rgb(path) -> Image.Image:
    """Decode `path` fully, apply its EXIF orientation, return an RGB image.

    Raises ImageReadError with a short reason for any file that cannot be used."""
    return _open_and(path, upright_rgb)


def read_image_size(path) -> tuple:
    """(width, height) from the file's header, after Pillow's structural check
    (Image.verify). Much cheaper than a full decode, but a JPEG cut short after its
    header passes: only load_rgb finds that. Raises ImageReadError like load_rgb."""
    return _open_and(path, _verified_size)


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
