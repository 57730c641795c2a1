"""Small valid image files in every format Pillow here reads, made on the spot (nothing is
fetched), and byte-level mutations of them: the seeds of the fuzz tests and the mixed
folders of the end-to-end tests."""
import io
import random
import struct
import zlib

import numpy as np
from PIL import Image, ImageFile, features

W, H = 40, 30  # small, and not square, so that a swapped width/height shows


def _rgb(seed=0, size=(W, H)):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def _save(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def psd_bytes(size=(W, H), layer=True) -> bytes:
    """A minimal Photoshop file (Pillow cannot write PSD): RGB, 8 bits, the composite
    image stored raw, channel after channel; with `layer`, one full-size RGB layer too
    (Pillow numbers the layers 1..n as frames: a PSD has no frame 0)."""
    width, height = size
    planes = np.asarray(_rgb(3, size)).transpose(2, 0, 1)  # (3, H, W)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    layers = b""
    if layer:
        record = struct.pack(">iiiiH", 0, 0, height, width, 3)
        record += b"".join(struct.pack(">HI", channel, 2 + width * height) for channel in range(3))
        record += b"8BIMnorm" + bytes((255, 0, 0, 0))
        record += struct.pack(">I", 12) + struct.pack(">II", 0, 0) + b"\x02L1\x00"  # no mask, no ranges, name
        pixels = b"".join(struct.pack(">H", 0) + planes[c][::-1].tobytes() for c in range(3))
        info = struct.pack(">h", 1) + record + pixels
        info += b"\x00" * (len(info) % 2)
        layers = struct.pack(">I", len(info)) + info + struct.pack(">I", 0)
    sections = struct.pack(">II", 0, 0) + struct.pack(">I", len(layers)) + layers
    return header + sections + struct.pack(">H", 0) + planes.tobytes()


def icns_bytes() -> bytes:
    """A small Apple icon with PNG-coded 16x16 and 64x64 entries (Pillow's own writer
    adds every size up to 1024x1024: over a megabyte)."""
    entries = b"".join(kind + struct.pack(">I", 8 + len(png)) + png
                       for kind, png in ((b"icp4", _save(_rgb(11, (16, 16)), "PNG")),
                                         (b"icp6", _save(_rgb(11, (64, 64)), "PNG"))))
    return b"icns" + struct.pack(">I", 8 + len(entries)) + entries


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    return _save(_rgb(4), "JPEG", exif=exif.tobytes())


def _frames(n=3):
    return [_rgb(10 + k) for k in range(n)]


def _sixteen_bit_tiff() -> bytes:
    a = (np.linspace(0, 65535, W * H).reshape(H, W)).astype(np.uint16)
    return _save(Image.fromarray(a), "TIFF")


def _float_tiff() -> bytes:
    return _save(Image.fromarray(np.linspace(0, 1, W * H, dtype=np.float32).reshape(H, W)), "TIFF")


def _palette_alpha_png() -> bytes:
    img = _rgb(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(img, "PNG", transparency=0)


def valid_files() -> dict:
    """{file name: bytes}: one small valid file per format and mode variant. The
    extension is the format's own, so that find_images picks every one up."""
    frames = _frames()
    files = {
        "rgb.jpg": _save(_rgb(1), "JPEG"),
        "gray.jpg": _save(_rgb(1).convert("L"), "JPEG"),
        "cmyk.jpg": _save(_rgb(1).convert("CMYK"), "JPEG"),
        "progressive.jpg": _save(_rgb(1), "JPEG", progressive=True),
        "exif_rotated.jpg": _exif_rotated_jpeg(),
        "rgb.png": _save(_rgb(2), "PNG"),
        "rgba.png": _save(_rgb(2).convert("RGBA"), "PNG"),
        "gray_alpha.png": _save(_rgb(2).convert("LA"), "PNG"),
        "palette_alpha.png": _palette_alpha_png(),
        "bilevel.png": _save(_rgb(2).convert("1"), "PNG"),
        "sixteen_bit.png": _save(Image.fromarray((np.arange(W * H).reshape(H, W) * 50).astype(np.uint16)), "PNG"),
        "animated.png": _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "lossy.webp": _save(_rgb(6), "WEBP", quality=80),
        "alpha.webp": _save(_rgb(6).convert("RGBA"), "WEBP", lossless=True),
        "animated.webp": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "still.gif": _save(_rgb(7).convert("P"), "GIF"),
        "animated.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "rgb.tif": _save(_rgb(8), "TIFF"),
        "lzw.tiff": _save(_rgb(8), "TIFF", compression="tiff_lzw"),
        "multipage.tif": _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "sixteen_bit.tif": _sixteen_bit_tiff(),
        "float.tif": _float_tiff(),
        "cmyk.tif": _save(_rgb(8).convert("CMYK"), "TIFF"),
        "lab.tif": _save(_rgb(8).convert("LAB"), "TIFF"),
        "rgb.bmp": _save(_rgb(9), "BMP"),
        "palette.bmp": _save(_rgb(9).convert("P"), "BMP"),
        "bilevel.bmp": _save(_rgb(9).convert("1"), "BMP"),
        "sizes.ico": _save(_rgb(11, (64, 64)), "ICO", sizes=[(16, 16), (32, 32), (64, 64)]),
        "photoshop.psd": psd_bytes(),
        "flat.psd": psd_bytes(layer=False),
        "mpo.mpo": _save(frames[0], "MPO", save_all=True, append_images=frames[1:2]),
        "rgb.tga": _save(_rgb(12), "TGA"),
        "rgb.pcx": _save(_rgb(12), "PCX"),
        "rgb.ppm": _save(_rgb(12), "PPM"),
        "rgb.sgi": _save(_rgb(12), "SGI"),
        "rgb.qoi": _save(_rgb(12), "QOI"),
        "rgba.dds": _save(_rgb(12).convert("RGBA"), "DDS"),
        "icon.icns": icns_bytes(),
        "rgb.im": _save(_rgb(15), "IM"),
        # SPIDER has no extension in Pillow's registry (folder scans skip *.spi); Pillow reads by content.
        "float_spider.tif": _save(_rgb(15).convert("F"), "SPIDER"),
        "bilevel.msp": _save(_rgb(15).convert("1"), "MSP"),
        "bilevel.xbm": _save(_rgb(15).convert("1"), "XBM"),
        "palette.blp": _save(_rgb(15).convert("P"), "BLP"),
        "rgb.dib": _save(_rgb(15), "DIB"),
    }
    if features.check("jpg_2000"):
        files["rgb.jp2"] = _save(_rgb(13), "JPEG2000")
        files["rgb.j2k"] = _save(_rgb(13), "JPEG2000")
    if features.check("avif"):
        files["rgb.avif"] = _save(_rgb(14), "AVIF", quality=60)
    return files


def expected_size(name: str) -> tuple:
    """(width, height) load_rgb must return for valid_files()[name]."""
    if name == "exif_rotated.jpg":
        return H, W
    if name in ("sizes.ico", "icon.icns"):
        return 64, 64  # the largest size the container holds
    return W, H


# --- mutations -----------------------------------------------------------------

def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(0, max(len(data), 1))]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 16))):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def random_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    if out:
        start = rng.randrange(len(out))
        n = min(rng.choice((1, 4, 16, 64)), len(out) - start)
        out[start:start + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(out)


def interesting_ints(data: bytes, rng: random.Random) -> bytes:
    """A 2- or 4-byte field, most likely in the header, set to a boundary value: the sizes,
    offsets and counts that decoders trust."""
    out = bytearray(data)
    if len(out) < 4:
        return bytes(out)
    width = rng.choice((2, 4))
    pos = rng.randrange(0, min(len(out), 128) - width + 1) if rng.random() < 0.8 else rng.randrange(len(out) - width + 1)
    value = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(out)))
    value &= (1 << (8 * width)) - 1
    out[pos:pos + width] = value.to_bytes(width, rng.choice(("big", "little")))
    return bytes(out)


def splice(data: bytes, other: bytes, rng: random.Random) -> bytes:
    """The head of one file joined to the tail of another (often another format's)."""
    cut_a = rng.randrange(0, len(data) + 1)
    cut_b = rng.randrange(0, len(other) + 1)
    return data[:cut_a] + other[cut_b:]


def duplicate_chunk(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 2:
        return data + data
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.choice((4, 16, 64, 512)))
    at = rng.randrange(len(data))
    return data[:at] + data[a:b] + data[at:]


MUTATIONS = (truncate, flip_bytes, random_bytes, interesting_ints, duplicate_chunk)


def mutate(data: bytes, others: list, rng: random.Random) -> bytes:
    """One to three random mutations of `data` (`others`: files to splice from)."""
    for _ in range(rng.choice((1, 1, 2, 3))):
        if rng.random() < 0.15:
            data = splice(data, rng.choice(others), rng)
        else:
            data = rng.choice(MUTATIONS)(data, rng)
    return data


# --- broken files ----------------------------------------------------------------

FAULT_MAGIC = b"NIMAFAULT:"
FAULTS = {"EOFError": EOFError, "struct.error": struct.error, "IndexError": IndexError, "KeyError": KeyError,
          "ZeroDivisionError": ZeroDivisionError, "MemoryError": MemoryError, "RuntimeError": RuntimeError}


class FaultImageFile(ImageFile.ImageFile):
    """A stand-in decoder that raises the exception its file names. Pillow's own decoders
    raise each of these on some damaged file, but the generated seeds and their mutations
    do not reach every such path in this Pillow; this makes each one certain."""
    format, format_description = "NIMAFAULT", "test decoder that fails"

    def _open(self):
        self._fault = self.fp.read(64)[len(FAULT_MAGIC):].split(b"\n")[0].decode()
        self._mode, self._size, self.tile = "RGB", (W, H), []

    def load(self):
        raise FAULTS[self._fault](f"{self._fault} raised while decoding (test decoder)")


def register_fault_decoder() -> None:
    """Let Pillow open fault_file()s, in this process and the loader workers it forks."""
    if "NIMAFAULT" not in Image.OPEN:
        Image.register_open("NIMAFAULT", FaultImageFile, lambda prefix: prefix.startswith(FAULT_MAGIC))


def fault_file(name: str) -> bytes:
    return FAULT_MAGIC + name.encode() + b"\n"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _tiff_with_float_offsets() -> bytes:
    """A TIFF whose StripOffsets tag is typed DOUBLE: Pillow raises TypeError in load()."""
    data = bytearray(_save(_rgb(8), "TIFF"))
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for k in range(struct.unpack(order + "H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack(order + "H", data[entry:entry + 2])[0] == 273:
            data[entry + 2:entry + 4] = struct.pack(order + "H", 12)
    return bytes(data)


def tiff_with_oversized_tag() -> bytes:
    """A valid TIFF whose ImageDescription claims more bytes than the file holds: Pillow
    skips the tag with a UserWarning and decodes the pixels."""
    data = bytearray(_save(_rgb(8), "TIFF", tiffinfo={270: "a description"}))
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for k in range(struct.unpack(order + "H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack(order + "H", data[entry:entry + 2])[0] == 270:
            data[entry + 4:entry + 8] = struct.pack(order + "I", 10**6)
    return bytes(data)


def broken_files(max_pixels: int) -> dict:
    """{file name: (bytes, start of the reason load_rgb must give)} with --max_image_pixels
    `max_pixels` (at least 100 x 100): every kind of unreadable file, one each. The
    fault files need register_fault_decoder()."""
    valid = valid_files()
    side = int(max_pixels ** 0.5) + 10
    bomb = io.BytesIO()
    Image.new("L", (side, side)).save(bomb, "PNG")  # a few kB of zeros, over the limit once decoded
    files = {f"fault_{name.replace('.', '_')}.png": (fault_file(name), f"undecodable: {name}")
             for name in FAULTS}
    files.update({
        "zero_bytes.jpg": (b"", "zero-byte file"),
        "bomb.png": (bomb.getvalue(), "too large"),
        "huge_header.png": (_png_header_only(40_000, 40_000), "too large"),
        "truncated.jpg": (valid["rgb.jpg"][:len(valid["rgb.jpg"]) // 2], "truncated image"),
        "not_an_image.jpg": (b"this is not an image\n", "not an image Pillow can identify"),
        "float_offsets.tif": (_tiff_with_float_offsets(), "undecodable: TypeError"),
        "cut_header.psd": (valid["photoshop.psd"][:30], "not an image Pillow can identify"),
        "no_pixels.gif": (valid["still.gif"][:40], "not an image Pillow can identify"),
    })
    return files
