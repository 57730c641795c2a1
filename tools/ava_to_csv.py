"""Turn the AVA data set's own annotation file into the reference's split CSVs.

    python -m tools.ava_to_csv --ava_txt AVA.txt --img_path IMAGES --out_dir DIR [--seed 0]
        [--val_size N] [--test_size N | --test_list FILE] [--workers N] [--full_decode]

AVA.txt (README, "Data tools") has 15 space-separated columns: row index, image id, votes
for ratings 1..10, two semantic tags, challenge id. Writes into DIR, atomically:
train_labels.csv, val_labels.csv, test_labels.csv (README, "Formats": no header, id then
the 10 vote fractions, rows in AVA.txt order) and rejected.csv (`image_id,reason`)
for entries left out: zero votes, image missing from IMAGES, or unreadable. Every
entry of AVA.txt ends up in exactly one of the four files.

The split is random (--seed) with the reference split's proportions (229,981 /
12,691 / 12,818 of 255,490) unless --val_size/--test_size give counts, or
--test_list names the test ids (one per line, such as the lists AVA ships).
Readability: by default a cheap check (file not empty, header parses, Image.verify);
--full_decode decodes every image (what tools/check_images.py does, slower).
Exit codes: 0 splits written (rejected entries are listed, not a failure);
2 malformed AVA.txt (every bad line reported) or bad usage.
"""
if not __package__:  # run by path (python tools/ava_to_csv.py): run as python -m tools.ava_to_csv
    import _by_path
    _by_path.run_as_module(__file__)

import csv
import io
import os
import sys


import numpy as np

from dataset.images import is_image_file
from dataset.images import DEFAULT_MAX_PIXELS
from dataset.label_text import LabelFileError, read_label_text, show_cell, split_lines
from dataset.labels import NUM_BINS, ImageIndex
from engine.flags import ArgumentParser
from fileio import atomic_write_text
from tools.check_images import check_paths

AVA_COLUMNS = 15
# The reference's split (its train/val/test CSVs) of the 255,490 AVA images.
REFERENCE_SPLIT = {"train": 229_981, "val": 12_691, "test": 12_818}
REFERENCE_TOTAL = sum(REFERENCE_SPLIT.values())


class UsageError(ValueError):
    pass


def parse_ava(path) -> list:
    """[(line, image id, votes (10 ints))] for every entry; raises LabelFileError listing
    every malformed line (column count, non-integers, negative votes, duplicate ids)."""
    entries, problems, seen = [], [], {}
    # Any bytes: UTF-8 (a BOM allowed) with LF, CRLF or CR line ends, else LabelFileError.
    for line_no, line in enumerate(split_lines(read_label_text(path)), start=1):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != AVA_COLUMNS:
            problems.append(f"{line_no}: has {len(cells)} columns, expected {AVA_COLUMNS} (index, image id, "
                            f"votes for ratings 1..10, 2 semantic tags, challenge id)")
            continue
        image_id, bad = cells[1], []
        for col, text in enumerate(cells, start=1):
            if col == 2:
                continue
            if _int_or_none(text) is None:
                bad.append(f"{line_no}, column {col}: {show_cell(text)} is not an integer")
            elif 3 <= col <= 2 + NUM_BINS and int(text) < 0:
                bad.append(f"{line_no}, column {col}: negative vote count {text[:40]}")
        if image_id in seen:
            bad.append(f"{line_no}, column 2: duplicate image id {show_cell(image_id)} (first on line {seen[image_id]})")
        seen.setdefault(image_id, line_no)
        problems.extend(bad)
        if not bad:
            entries.append((line_no, image_id, [int(c) for c in cells[2:2 + NUM_BINS]]))
    if problems:
        raise LabelFileError(path, problems)
    if not entries:
        raise LabelFileError(path, ["0: no entries"])
    return entries


def _int_or_none(text):
    try:
        return int(text)
    except ValueError:
        return None


def read_id_list(path) -> set:
    """Image ids, one per line (an extension such as .jpg is dropped). Raises
    LabelFileError for a file that is not UTF-8 text."""
    if not os.path.isfile(path):
        raise UsageError(f"--test_list {path!r}: no such file")
    ids = [line.strip() for line in split_lines(read_label_text(path)) if line.strip()]
    return {os.path.splitext(i)[0] if is_image_file(i) else i for i in ids}


def find_rejects(entries, img_path, workers, full_decode, progress, max_pixels=None) -> dict:
    """{image id: reason} for entries that cannot be used."""
    rejected, to_check = {}, {}
    index = ImageIndex(img_path)
    for _, image_id, votes in entries:
        if sum(votes) == 0:
            rejected[image_id] = "zero votes"
            continue
        path = index.resolve(image_id)
        if path is None:
            rejected[image_id] = f"missing: no image file for this id in {img_path}"
        else:
            to_check[path] = image_id
    bad = check_paths(list(to_check), workers, full_decode=full_decode, progress=progress,
                      desc="decode images" if full_decode else "check image headers", max_pixels=max_pixels)
    for path, reason in bad.items():
        rejected[to_check[path]] = f"unreadable: {reason}"
    return rejected


def split_ids(ids, seed, val_size=None, test_size=None, test_ids=None) -> dict:
    """{'train', 'val', 'test'} -> list of ids (in the order of `ids`), disjoint, covering `ids`.

    Test: the ids in `test_ids` when given, else `test_size` drawn at random (default:
    the reference's proportion). Val: `val_size` drawn at random from the rest."""
    n, rng = len(ids), np.random.default_rng(seed)
    if test_ids is not None:
        test = {i for i in ids if i in test_ids}
    else:
        test_size = round(n * REFERENCE_SPLIT["test"] / REFERENCE_TOTAL) if test_size is None else test_size
        if test_size > n:
            raise UsageError(f"--test_size {test_size} exceeds the {n} usable images")
        test = {ids[k] for k in rng.permutation(n)[:test_size].tolist()}
    rest = [i for i in ids if i not in test]
    val_size = round(n * REFERENCE_SPLIT["val"] / REFERENCE_TOTAL) if val_size is None else val_size
    if val_size > len(rest):
        raise UsageError(f"--val_size {val_size} exceeds the {len(rest)} usable images left after the test split")
    val = {rest[k] for k in rng.permutation(len(rest))[:val_size].tolist()}
    return {"train": [i for i in rest if i not in val], "val": [i for i in rest if i in val],
            "test": [i for i in ids if i in test]}


def labels_csv_text(ids, votes_by_id) -> str:
    """Reference format: no header, id then the 10 vote fractions (sum 1)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for image_id in ids:
        votes = votes_by_id[image_id]
        total = sum(votes)
        writer.writerow([image_id] + [f"{v / total:.6g}" for v in votes])
    return buf.getvalue()


def get_args_parser():
    p = ArgumentParser(description="AVA.txt -> train/val/test label CSVs (reference format) and rejected.csv.")
    p.add_argument("--ava_txt", required=True, help="AVA.txt: 15 space-separated columns per image")
    p.add_argument("--img_path", required=True, help="folder of the AVA images (<id>.jpg)")
    p.add_argument("--out_dir", required=True, help="folder for train/val/test_labels.csv and rejected.csv")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split")
    p.add_argument("--val_size", type=int, default=None, help="validation images (default: the reference's proportion, 12,691 of 255,490)")
    p.add_argument("--test_size", type=int, default=None, help="test images (default: the reference's proportion, 12,818 of 255,490)")
    p.add_argument("--test_list", default=None, help="file of test image ids, one per line (instead of a random test split)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes checking the images")
    p.add_argument("--full_decode", action="store_true", help="decode every image fully instead of checking headers")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"reject images of more than N pixels, as training would (default: Pillow's limit, {DEFAULT_MAX_PIXELS})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args) -> int:
    try:
        if args.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {args.workers}")
        if args.max_image_pixels < 1:
            raise UsageError(f"--max_image_pixels must be >= 1 (width x height), got {args.max_image_pixels}")
        for name in ("val_size", "test_size"):
            if getattr(args, name) is not None and getattr(args, name) < 0:
                raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
        if args.test_list and args.test_size is not None:
            raise UsageError("--test_list and --test_size exclude each other: the list sets the test split")
        if not os.path.isfile(args.ava_txt):
            raise UsageError(f"--ava_txt {args.ava_txt!r}: no such file")
        if not os.path.isdir(args.img_path):
            raise UsageError(f"--img_path {args.img_path!r} is not a folder")
        test_ids = read_id_list(args.test_list) if args.test_list else None
        entries = parse_ava(args.ava_txt)
    except (UsageError, LabelFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rejected = find_rejects(entries, args.img_path, args.workers, args.full_decode, not args.quiet, args.max_image_pixels)
    votes_by_id = {image_id: votes for _, image_id, votes in entries}
    usable = [image_id for _, image_id, _ in entries if image_id not in rejected]
    if test_ids is not None:
        unknown = test_ids - votes_by_id.keys()
        if unknown:
            print(f"warning: {len(unknown)} id{'s' if len(unknown) != 1 else ''} of --test_list {'are' if len(unknown) != 1 else 'is'} not in {args.ava_txt}, ignored "
                  f"(e.g. {', '.join(sorted(unknown)[:5])})", file=sys.stderr)
    try:
        splits = split_ids(usable, args.seed, args.val_size, args.test_size, test_ids)
        for name, ids in splits.items():
            atomic_write_text(os.path.join(args.out_dir, f"{name}_labels.csv"), labels_csv_text(ids, votes_by_id))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(
            [("image_id", "reason")] + [(i, rejected[i]) for _, i, _ in entries if i in rejected])
        atomic_write_text(os.path.join(args.out_dir, "rejected.csv"), buf.getvalue())
    except (UsageError, OSError) as exc:  # OSError: OutputWriteError, or a folder that cannot be made
        print(f"error: {exc}", file=sys.stderr)
        return 2

    kinds = {}
    for reason in rejected.values():
        kind = reason.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"{len(entries)} entries in {args.ava_txt}: rejected {len(rejected)}"
          + (f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})" if rejected else "")
          + f"; train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
