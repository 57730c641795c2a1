"""Build the small demo data set: procedural photos whose rating distributions follow
visible quality (blur, noise, contrast, exposure), with train/val/test CSVs in the
reference format (id, then vote counts for ratings 1..10; no header).

    python -m tools.make_demo_data --out data/demo --num_images 600
"""
if not __package__:  # run by path (python tools/make_demo_data.py): run as python -m tools.make_demo_data
    import _by_path
    _by_path.run_as_module(__file__)

import csv
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from engine.flags import ArgumentParser

VOTES_PER_IMAGE = 200


def scene(rng, width, height) -> Image.Image:
    """A clean picture: a two-colour gradient sky and a few solid shapes."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 7)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 8, width // 2), rng.integers(height // 8, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [x0, y0, x0 + w, y0 + h]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    for _ in range(rng.integers(2, 6)):  # thin lines: fine detail that blur destroys
        pts = [int(v) for v in (rng.integers(0, width), rng.integers(0, height), rng.integers(0, width), rng.integers(0, height))]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    return img


def degrade(rng, img) -> tuple:
    """Apply random degradations; return (image, quality in [0, 1])."""
    blur, noise, contrast, exposure = (float(v) for v in rng.random(4) ** 1.5)  # skewed toward mild damage
    img = img.filter(ImageFilter.GaussianBlur(radius=3.0 * blur))
    img = ImageEnhance.Contrast(img).enhance(1.0 - 0.8 * contrast)
    img = ImageEnhance.Brightness(img).enhance(1.0 + (0.9 if rng.random() < 0.5 else -0.7) * exposure)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 60.0 * noise, (img.height, img.width, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    damage = (blur + noise + contrast + exposure) / 4.0
    return img, float(np.clip(1.0 - 1.6 * damage, 0.0, 1.0))


def votes(rng, quality) -> np.ndarray:
    """200 votes around a mean that follows quality, like AVA's bell-shaped histograms."""
    mean = 2.5 + 5.5 * quality + rng.normal(0, 0.25)
    scores = np.clip(np.rint(rng.normal(mean, 1.4, VOTES_PER_IMAGE)), 1, 10).astype(int)
    return np.bincount(scores, minlength=11)[1:]


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def get_args_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/demo", help="output folder (images/ and three CSVs)")
    p.add_argument("--num_images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_fraction", type=float, default=0.15)
    p.add_argument("--test_fraction", type=float, default=0.15)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    img_dir = os.path.join(args.out, "images")
    os.makedirs(img_dir, exist_ok=True)
    rows = []
    for n in range(args.num_images):
        width, height = (96, 72) if rng.random() < 0.75 else (72, 96)
        img, quality = degrade(rng, scene(rng, width, height))
        image_id = f"demo{n:05d}"
        img.save(os.path.join(img_dir, image_id + ".jpg"), quality=92)
        rows.append([image_id, *votes(rng, quality).tolist()])
    n_val, n_test = int(args.num_images * args.val_fraction), int(args.num_images * args.test_fraction)
    order = rng.permutation(len(rows))
    splits = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    for name, idx in splits.items():
        write_csv(os.path.join(args.out, f"{name}_labels.csv"), [rows[i] for i in sorted(idx)])
    print(f"demo data: {len(rows)} images in {img_dir}; " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
