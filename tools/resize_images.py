"""Build a resized image cache: every image re-encoded as an upright RGB JPEG with its
shorter side at --size, so training and testing decode a few times faster.

    python -m tools.resize_images --src IMAGES --dst IMAGES_256 --size 256 --workers 8
    python main.py --train --img_path IMAGES_256 ...      # same CSVs, same ids

Relative paths and file names are kept (the contents are always JPEG, whatever the
name says; Pillow reads by content), so the label CSVs resolve in the cache as in the
originals. The resize is torchvision's Resize(size) (bilinear, antialiased, as in
the training and evaluation transforms), after the EXIF orientation is applied, so
with --size equal to the model's resize_size (256 for VGG16) the transforms' own
Resize becomes a no-op and the crops equal those from the originals up to JPEG
re-encoding. Images whose shorter side is already at most --size are re-encoded
without upscaling.

Rerunning is cheap: a destination newer than its source with the expected shorter
side is skipped; every file is written under a temporary name and renamed, so a killed
run never leaves a half-written image (its hidden *.tmp leftovers are removed on the
next run). Exit codes: 0 all done; 1 some images unreadable (listed, the rest written);
2 bad usage.
"""
if not __package__:  # run by path (python tools/resize_images.py): run as python -m tools.resize_images
    import _by_path
    _by_path.run_as_module(__file__)

import os
import sys

from dataset.images import DEFAULT_MAX_PIXELS, ImageReadError, find_images, header_size, load_rgb
from engine.flags import ArgumentParser
from fileio import OutputWriteError, atomic_path
from engine.parallel import parallel_map

WRITTEN, UP_TO_DATE, FAILED = "written", "up to date", "failed"


def get_args_parser():
    p = ArgumentParser(description="Re-encode every image under --src with its shorter side at --size into --dst.")
    p.add_argument("--src", required=True, help="folder of original images (searched recursively)")
    p.add_argument("--dst", required=True, help="cache folder (created; same relative paths and file names as --src)")
    p.add_argument("--size", type=int, default=256, help="shorter side in pixels; use the model's --resize_size (256 for vgg16)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes; 0 or 1 runs in this process")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the cache, 1..100")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"an image of more than N pixels is unreadable, as in training (default: Pillow's limit, {DEFAULT_MAX_PIXELS})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_usage(args) -> None:
    """Raise ValueError naming the bad flag, before any work."""
    if not os.path.isdir(args.src):
        raise ValueError(f"--src {args.src!r} is not a folder")
    if args.size < 1 or args.workers < 0 or not 1 <= args.quality <= 100 or args.max_image_pixels < 1:
        raise ValueError(f"--size must be >= 1, --workers >= 0, --quality in 1..100 and --max_image_pixels >= 1; "
                         f"got {args.size}, {args.workers}, {args.quality}, {args.max_image_pixels}")
    src, dst = os.path.realpath(args.src), os.path.realpath(args.dst)
    if dst == src or dst.startswith(src + os.sep):
        # The originals would be overwritten, or the cache re-read as originals next run.
        raise ValueError(f"--dst {args.dst!r} must not be --src or a folder inside it")


def expected_short_side(src_path, size: int, max_pixels=None):
    """Shorter side the cached copy of `src_path` must have (None if the header is unreadable)."""
    try:
        return min(size, min(header_size(src_path, max_pixels)))  # EXIF rotation swaps the sides, not the shorter one
    except ImageReadError:
        return None


def is_up_to_date(src_path, dst_path, size: int, max_pixels=None) -> bool:
    try:
        if os.path.getmtime(dst_path) < os.path.getmtime(src_path):
            return False
        short = min(header_size(dst_path, max_pixels))
    except (OSError, ImageReadError):  # missing or unreadable destination: (re)write it
        return False
    return short == expected_short_side(src_path, size, max_pixels)


def resize_one(task) -> tuple:
    """(src_path, status, reason) for one image; never raises, so one bad file cannot
    stop the pool."""
    src_path, dst_path, size, quality, max_pixels = (*task, None)[:5]
    if is_up_to_date(src_path, dst_path, size, max_pixels):
        return src_path, UP_TO_DATE, ""
    try:
        img = load_rgb(src_path, max_pixels)  # EXIF orientation applied, any mode -> RGB
        if min(img.size) > size:  # a downscale: never more pixels than the original's
            from torchvision.transforms import InterpolationMode  # here: --help and usage errors need no torch
            from torchvision.transforms import functional as F
            img = F.resize(img, size, interpolation=InterpolationMode.BILINEAR)
    except ImageReadError as exc:
        return src_path, FAILED, str(exc)
    except Exception as exc:  # noqa: BLE001 - the resize of one odd image: its failure, not the pool's
        return src_path, FAILED, f"cannot resize: {type(exc).__name__}: {exc}"[:200]
    try:
        with atomic_path(dst_path) as tmp:
            img.save(tmp, "JPEG", quality=quality)
    except (OutputWriteError, OSError, ValueError) as exc:
        return src_path, FAILED, f"could not write {dst_path}: {exc}"
    return src_path, WRITTEN, ""


def remove_stale_temp_files(dst: str) -> int:
    """Temporary files (.NAME.XXXX.tmp, see fileio.atomic_path) left by a killed run."""
    removed = 0
    for folder, _, files in os.walk(dst):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def main(args) -> int:
    try:
        check_usage(args)
        _, paths = find_images(args.src)
        if not paths:
            raise ValueError(f"--src {args.src!r}: no image files found")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.path.isdir(args.dst):
        remove_stale_temp_files(args.dst)
    tasks = [(p, os.path.join(args.dst, os.path.relpath(p, args.src)), args.size, args.quality, args.max_image_pixels)
             for p in paths]
    # Chunks big enough to keep the pipe quiet, small enough to balance the workers.
    results = parallel_map(resize_one, tasks, args.workers, f"resize to {args.size}", not args.quiet, chunks_per_worker=8)
    failed = sorted((path, reason) for path, status, reason in results if status == FAILED)
    written = sum(status == WRITTEN for _, status, _ in results)
    print(f"{args.dst}: {written} written, {len(results) - written - len(failed)} up to date, "
          f"{len(failed)} failed, of {len(results)} images under {args.src}")
    if failed:
        print(f"{len(failed)} of {len(results)} image{'s' if len(results) != 1 else ''} could not be cached:", file=sys.stderr)
        for path, reason in failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
