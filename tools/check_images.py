"""Decode every image fully, in parallel, and list the ones training could not use:
zero-byte, truncated, non-image, undecodable and too large (--max_image_pixels) files,
and, when asked (--min_size), images smaller than you want to keep.

    python -m tools.check_images --img_path IMAGES [--csv train_labels.csv] [--workers 16] [--min_size N]

Without --csv every image under IMAGES (recursively) is checked; with --csv the
images its rows name (a missing file counts as bad too), and a cleaned copy of the
CSV is written: <csv stem>_clean.csv, the input's lines byte for byte minus the rows
of bad images (a header stays). The report <csv stem>_bad_images.csv (or
bad_images.csv without --csv) has one `path,reason` row per bad image. Both go into
--out: by default the CSV's folder, or the current folder without --csv.
Exit codes: 0 all images good; 1 some bad (report and cleaned CSV written); 2 bad usage.
"""
if not __package__:  # run by path (python tools/check_images.py): run as python -m tools.check_images
    import _by_path
    _by_path.run_as_module(__file__)

import collections
import csv
import functools
import io
import os
import sys
import time



from dataset.decode_limits import decode_limits
from dataset.images import DEFAULT_MAX_PIXELS, ImageReadError, find_images, load_rgb, read_image_size
from dataset.label_text import LabelFileError, label_rows, read_label_text, split_lines
from dataset.labels import ImageIndex, expected_path
from engine.flags import ArgumentParser
from fileio import atomic_path, atomic_write_text
from engine.flags import add_decode_flags, apply_decode_flags
from engine.parallel import parallel_map


def check_image(path, min_size=0, full_decode=True, max_pixels=None, limits=None):
    """None for a usable image, else the reason it is not. Top-level so a Pool can pickle it.
    Never raises: load_rgb turns every decoder failure into ImageReadError, and anything
    else that goes wrong with one file is that file's reason, not the end of the check.
    limits: the decode limits (deadline, memory, scans; None: this process's)."""
    try:
        width, height = load_rgb(path, max_pixels, limits).size if full_decode else read_image_size(path, max_pixels)
    except ImageReadError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one file's problem, whatever it is, is reported with it
        return f"undecodable: {type(exc).__name__}: {exc}"[:200]
    if min(width, height) < min_size:
        return f"too small: {width}x{height}, shorter side below --min_size {min_size}"
    return None


def check_paths(paths, workers=1, min_size=0, full_decode=True, progress=True, desc="check images", max_pixels=None) -> dict:
    """{path: reason} for every bad image among `paths`, checked by `workers` processes
    with this process's decode limits."""
    check = functools.partial(_path_and_reason, min_size=min_size, full_decode=full_decode, max_pixels=max_pixels,
                              limits=decode_limits())
    return {p: r for p, r in parallel_map(check, paths, workers, desc, progress) if r}


def _path_and_reason(path, min_size, full_decode, max_pixels=None, limits=None):
    return path, check_image(path, min_size, full_decode, max_pixels, limits)


def category(reason: str) -> str:
    """The kind of problem, for the summary: the reason up to its first colon."""
    return reason.split(":", 1)[0]


def read_csv_lines(csv_path, img_path) -> list:
    """[(raw line bytes, image path or None)] for every line of a label CSV; None marks a
    header, blank or unparsable line, which the cleaned copy keeps as it is. The rows
    and their images are the training's (dataset.labels.label_rows, expected_path); a
    row whose quoted cell spans several lines gives each of them its image.
    Raises LabelFileError for a file that is not UTF-8 text."""
    text = read_label_text(csv_path)
    with open(csv_path, "rb") as f:
        raw_lines = split_lines(f.read())
    path_of_line = {}
    index = ImageIndex(img_path)
    for row in label_rows(text, index):
        if row.error or not row.cells or not row.cells[0]:
            continue
        # A missing image keeps its expected path, and the check reports it as "file not found".
        path = expected_path(index, row.cells[0])[0]
        for line in range(row.first_line, row.last_line + 1):
            path_of_line[line] = path
    return [(raw, path_of_line.get(n)) for n, raw in enumerate(raw_lines, start=1)]


def get_args_parser():
    p = ArgumentParser(description="Find images that cannot be used for training, and clean a label CSV of them.")
    p.add_argument("--img_path", required=True, help="image folder (searched recursively without --csv)")
    p.add_argument("--csv", default=None, help="label CSV: check only its images and write <stem>_clean.csv without the bad ones")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    p.add_argument("--min_size", type=int, default=0,
                   help="also list images whose shorter side is below N pixels, to drop thumbnails and icons you do not "
                        "want to train on (default 0: off; the transforms resize every image to the model's "
                        "--resize_size before cropping, so any size can be used)")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"an image of more than N pixels is bad, as in training and test.py (default: Pillow's limit, {DEFAULT_MAX_PIXELS})")
    add_decode_flags(p)
    p.add_argument("--out", default=None, help="folder for the report (and cleaned CSV); default: the CSV's folder, else the current one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args) -> int:
    if args.workers < 1 or args.min_size < 0 or args.max_image_pixels < 1:
        print(f"error: --workers and --max_image_pixels must be >= 1 and --min_size >= 0, got {args.workers}, "
              f"{args.max_image_pixels} and {args.min_size}", file=sys.stderr)
        return 2
    try:
        apply_decode_flags(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.img_path):
        print(f"error: --img_path {args.img_path!r} is not a folder", file=sys.stderr)
        return 2
    if args.csv and not os.path.isfile(args.csv):
        print(f"error: --csv {args.csv!r}: no such file", file=sys.stderr)
        return 2
    if args.csv:
        try:
            lines = read_csv_lines(args.csv, args.img_path)
        except LabelFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        paths = list(dict.fromkeys(p for _, p in lines if p))
        out_dir = args.out or os.path.dirname(os.path.abspath(args.csv))
        stem = os.path.splitext(os.path.basename(args.csv))[0]
        report_path, clean_path = os.path.join(out_dir, f"{stem}_bad_images.csv"), os.path.join(out_dir, f"{stem}_clean.csv")
    else:
        _, paths = find_images(args.img_path)
        out_dir = args.out or os.getcwd()
        report_path, clean_path = os.path.join(out_dir, "bad_images.csv"), None
    if not paths:
        print(f"error: no images to check in {args.csv or args.img_path}", file=sys.stderr)
        return 2

    workers = min(args.workers, len(paths))
    start = time.perf_counter()
    bad = check_paths(paths, workers, args.min_size, full_decode=True, progress=not args.quiet,
                      max_pixels=args.max_image_pixels)
    seconds = time.perf_counter() - start

    try:
        rows = sorted(bad.items())
        atomic_write_text(report_path, _csv_text([("path", "reason"), *rows]))
        if clean_path:
            kept = [raw for raw, path in lines if path is None or path not in bad]
            with atomic_path(clean_path) as tmp, open(tmp, "wb") as f:
                f.write(b"".join(kept))
    except OSError as exc:  # OutputWriteError, or a folder that cannot be made
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rate = len(paths) / max(seconds, 1e-9)
    print(f"checked {len(paths)} images in {seconds:.1f} s: {rate:.1f} images/s, "
          f"{rate / workers:.1f} images/s per worker ({workers} worker{'s' if workers > 1 else ''})")
    counts = collections.Counter(category(r) for r in bad.values())
    print(f"{len(bad)} bad" + (": " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common()) if bad else "")
          + f"; report: {report_path}")
    if clean_path:
        print(f"cleaned CSV: {clean_path} ({sum(1 for _, p in lines if p and p not in bad)} of "
              f"{sum(1 for _, p in lines if p)} rows kept)")
    return 1 if bad else 0


def _csv_text(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
