"""AVA-like JPEG files for the benchmarks and the resize-cache tests.

AVA photos are mostly about 640x430 (landscape, some portrait) and about 100 KB at
JPEG quality ~90. Decoding cost follows the pixel count and the compressed size, so
the generated files match both: the demo data's procedural scene (gradient sky,
shapes, thin lines) with a grain of Gaussian noise strong enough to bring a 640x430
file to about 100 KB.
"""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import os

import numpy as np
from PIL import Image

from fileio import atomic_path
from tools.make_demo_data import scene

# Luminance grain sigma 9 plus half as much colour grain gives ~100 KB at quality 90
# for 640x430 (measured: sigma 8 -> 96 KB, 10 -> 111 KB).
GRAIN_SIGMA = 9.0
PORTRAIT_FRACTION = 0.2


def ava_like_image(rng, width=640, height=430) -> Image.Image:
    pixels = np.asarray(scene(rng, width, height), dtype=np.float32)
    grain = rng.normal(0.0, GRAIN_SIGMA, (height, width, 1)) + rng.normal(0.0, GRAIN_SIGMA / 2, (height, width, 3))
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8), "RGB")


def make_ava_like_jpegs(folder, num_images: int, seed: int = 0, quality: int = 90) -> list:
    """Write `num_images` JPEGs named ava000000.jpg ... into `folder` (files already there
    with those names are kept, so a benchmark folder can be reused); return their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n in range(num_images):
        # Draw the size for every image, written or not, so image n is the same whatever
        # was there before.
        portrait = rng.random() < PORTRAIT_FRACTION
        short = int(rng.integers(400, 461))  # mean about 430
        width, height = (short, 640) if portrait else (640, short)
        path = os.path.join(folder, f"ava{n:06d}.jpg")
        if not os.path.exists(path):
            with atomic_path(path) as tmp:  # a killed run leaves no half file to be reused
                ava_like_image(np.random.default_rng([seed, n]), width, height).save(tmp, "JPEG", quality=quality)
        paths.append(path)
    return paths


def folder_stats(paths) -> dict:
    """Mean file size (KB) and mean pixel count of a list of images."""
    sizes = [os.path.getsize(p) for p in paths]
    pixels = []
    for p in paths:
        with Image.open(p) as img:
            pixels.append(img.width * img.height)
    return {"images": len(paths), "mean_kb": float(np.mean(sizes)) / 1000.0 if sizes else 0.0,
            "mean_megapixels": float(np.mean(pixels)) / 1e6 if pixels else 0.0}


PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "photos")
CAMERA_SIZE = (4000, 3000)  # 12 megapixels, a phone's or camera's 4:3 frame


def camera_like_jpegs(folder, num_images: int, size=CAMERA_SIZE, quality: int = 92, distinct: int = None) -> list:
    """Write `num_images` camera-sized JPEGs named cam000000.jpg ... into `folder`: the real
    photographs of tests/data/photos, each cut to the frame's aspect ratio (a centre crop,
    shifted and mirrored from one round of the photos to the next so that no two files are
    alike) and upscaled (bicubic) to `size`, landscape or portrait as the photo is. Decoding
    cost follows the pixel count and the compressed size, not the content's detail.
    `distinct`: make only that many files and hard-link the rest to them (decoding is the
    same work; 1,000 12-megapixel files would take minutes to make and gigabytes). Files
    already there are kept. Returns the paths."""
    os.makedirs(folder, exist_ok=True)
    photos = sorted(os.path.join(PHOTOS, n) for n in os.listdir(PHOTOS) if not n.endswith(".md"))
    paths = []
    for n in range(num_images):
        path = os.path.join(folder, f"cam{n:06d}.jpg")
        source = n % distinct if distinct else n
        if not os.path.exists(path):
            if source != n:
                os.link(paths[source], path)
            else:
                with atomic_path(path) as tmp:
                    camera_frame(photos[n % len(photos)], n // len(photos), size).save(tmp, "JPEG", quality=quality)
        paths.append(path)
    return paths


def camera_frame(photo_path, variant: int, size=CAMERA_SIZE) -> Image.Image:
    """One upscaled frame of a photo (see camera_like_jpegs); `variant` shifts the crop and
    mirrors every other one."""
    with Image.open(photo_path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    long_side, short_side = max(size), min(size)
    fw, fh = (long_side, short_side) if w >= h else (short_side, long_side)
    aspect = fw / fh
    cw, ch = (min(w, round(h * aspect)), min(h, round(w / aspect)))
    shift = (variant * 0.37) % 1.0  # where the crop sits along the spare width or height
    left, top = round((w - cw) * shift), round((h - ch) * shift)
    frame = rgb.crop((left, top, left + cw, top + ch)).resize((fw, fh), Image.Resampling.BICUBIC)
    return frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if variant % 2 else frame
