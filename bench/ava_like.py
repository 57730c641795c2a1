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
