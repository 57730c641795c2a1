"""Turn the label files of public image-quality data sets into this project's split CSVs.

    python -m tools.iqa_to_csv --dataset NAME --src FILE [FILE ...] --out_dir DIR
        [--seed 0] [--val_fraction 0.1] [--test_fraction 0.2] [--as_distributions]

NAME and the files each publisher distributes (README, "Quality data sets"):
  koniq10k  koniq10k_scores_and_distributions.csv (or koniq10k_distributions_sets.csv,
            whose `set` column is the official split): image_name, ..., MOS, SD; 1..5
  spaq      MOS and Image attribute scores.xlsx (or a CSV saved from it): Image name, MOS; 0..100
  tid2013   mos_with_names.txt ("MOS name" per line) and mos_std.txt (one std per line); 0..9
  kadid10k  dmos.csv: dist_img, ref_img, dmos, var (std = sqrt(var)); 1..5
  clive     LIVE in the Wild: AllImages_release.mat, AllMOS_release.mat, AllStdDev_release.mat; 0..100
            (the first 7 of the release's 1169 entries are the study's practice images, left out)

Writes train_labels.csv, val_labels.csv and test_labels.csv into DIR, atomically:
`image_id,mos,std` (`image_id,mos` for SPAQ, which gives no std) on the data set's own
scale, for `main.py --label_format mos --score_range LO HI`; or with --as_distributions
the maximum-entropy 10-bin distributions (no header), the reference's format, which
trains without --label_format. Prints the --score_range to pass. The split is the data
set's official one when its file has it (KonIQ's `set`), otherwise random (--seed); for
TID2013 and KADID-10k, whose images are distortions of a few reference photos, all
versions of one photo go to the same split, so no test photo was seen in training.
Exit codes: 0 written; 2 bad usage or a malformed file (every problem listed).
"""
if not __package__:  # run by path (python tools/iqa_to_csv.py): run as python -m tools.iqa_to_csv
    import _by_path
    _by_path.run_as_module(__file__)

import argparse
import csv
import io
import math
import os
import sys
import zipfile

import numpy as np

from dataset.label_text import LabelFileError, parse_number, read_label_text, show_cell, split_lines
from dataset.maxent import maxent_distributions
from dataset.mos import std_to_bins, to_bins
from engine.flags import ArgumentParser
from fileio import OutputWriteError, atomic_write_text
from dataset.xlsx import xlsx_rows

SCALES = {"koniq10k": (1.0, 5.0), "spaq": (0.0, 100.0), "tid2013": (0.0, 9.0), "kadid10k": (1.0, 5.0), "clive": (0.0, 100.0)}
SOURCES = {"koniq10k": "koniq10k_scores_and_distributions.csv", "spaq": "MOS and Image attribute scores.xlsx (or a CSV of it)",
           "tid2013": "mos_with_names.txt mos_std.txt", "kadid10k": "dmos.csv",
           "clive": "AllImages_release.mat AllMOS_release.mat AllStdDev_release.mat"}
SOURCE_COUNT = {"tid2013": 2, "clive": 3}  # --src files; one for the others
KONIQ_SETS = {"training": "train", "validation": "val", "test": "test"}
LIVE_PRACTICE_IMAGES, LIVE_RELEASE_SIZE = 7, 1169


class UsageError(ValueError):
    pass


def csv_rows(path):
    """[(line, cells)] of a CSV file, any line ends, blank lines skipped."""
    rows = []
    reader = csv.reader(split_lines(read_label_text(path)))
    for cells in reader:
        if any(c.strip() for c in cells):
            rows.append((reader.line_num, [c.strip() for c in cells]))
    return rows


def columns(path, header, wanted, optional=()):
    """{name: index} of the wanted columns in a header row (case-insensitively), or LabelFileError."""
    lower = [h.strip().lower() for h in header]
    found = {name: lower.index(name.lower()) for name in (*wanted, *optional) if name.lower() in lower}
    missing = [name for name in wanted if name not in found]
    if missing:
        raise LabelFileError(path, [f"1: no column {', '.join(map(repr, missing))} in the header "
                                    f"({', '.join(map(repr, header[:12]))}); is this the right file for --dataset?"])
    return found


def number(where, text, problems, lo=-math.inf, hi=math.inf, what="value"):
    """The number in `text`, or None with a problem appended (not a number, or outside lo..hi)."""
    value = parse_number(text)
    if value is None or not math.isfinite(value):
        problems.append(f"{where}: {show_cell(text)} is not a finite number")
    elif not lo <= value <= hi:
        # lo is 0 wherever hi is unbounded (stds, variances)
        problems.append(f"{where}: {what} {text[:40]} is outside {lo:g}..{hi:g}" if math.isfinite(hi) else f"{where}: negative {what} {text[:40]}")
    else:
        return value
    return None


def table_entries(path, rows, id_col, mos_col, std_col=None, var_col=None, group_col=None, set_col=None, scale=None):
    """Entries {id, mos, std, group, split} of a header-led table (CSV or sheet)."""
    (_, header), body = rows[0], rows[1:]
    names = [n for n in (id_col, mos_col) if n]
    cols = columns(path, header, names, [n for n in (std_col, var_col, group_col, set_col) if n])
    entries, problems = [], []
    for line, cells in body:
        def get(name, cells=cells):
            return cells[cols[name]] if name in cols and cols[name] < len(cells) else ""
        mos = number(f"{line}, column {cols[mos_col] + 1}", get(mos_col), problems, *scale, what="MOS")
        std = None
        if std_col in cols:
            std = number(f"{line}, column {cols[std_col] + 1}", get(std_col), problems, 0, what="std")
        elif var_col in cols:
            var = number(f"{line}, column {cols[var_col] + 1}", get(var_col), problems, 0, what="variance")
            std = None if var is None else math.sqrt(var)
        split = None
        if set_col in cols:
            split = KONIQ_SETS.get(get(set_col).lower())
            if split is None:
                problems.append(f"{line}, column {cols[set_col] + 1}: set {show_cell(get(set_col))} is not one of {', '.join(KONIQ_SETS)}")
        if not get(id_col):
            problems.append(f"{line}, column {cols[id_col] + 1}: empty image name")
        entries.append({"id": get(id_col), "mos": mos, "std": std, "group": get(group_col) if group_col else None,
                        "split": split, "line": line})
    return entries, problems


def tid2013_entries(mos_path, std_path, scale):
    """mos_with_names.txt ("MOS name" per line) and mos_std.txt (a std per line, same order)."""
    entries, problems = [], []
    for line, text in enumerate(split_lines(read_label_text(mos_path)), start=1):
        cells = text.split()
        if not cells:
            continue
        if len(cells) != 2:
            problems.append(f"{line}: has {len(cells)} fields, expected 2 (MOS, image name)")
            continue
        mos = number(f"{line}, column 1", cells[0], problems, *scale, what="MOS")
        # i01_01_1.bmp: a distortion of reference photo 01; every version of a photo stays in one split.
        entries.append({"id": cells[1], "mos": mos, "std": None, "group": cells[1][:3].lower(), "split": None, "line": line})
    if problems:
        raise LabelFileError(mos_path, problems)
    stds = [(line, t.strip()) for line, t in enumerate(split_lines(read_label_text(std_path)), start=1) if t.strip()]
    if len(stds) != len(entries):
        raise LabelFileError(std_path, [f"0: {len(stds)} stds for the {len(entries)} MOS lines of {mos_path}; "
                                        f"the two files must list the same images in the same order"])
    for entry, (line, text) in zip(entries, stds):
        entry["std"] = number(str(line), text, problems, 0, what="std")
    if problems:
        raise LabelFileError(std_path, problems)
    return entries


def live_entries(paths, scale):
    """LIVE in the Wild's three .mat files, recognised by the variable each holds."""
    from scipy.io import loadmat  # only this data set needs it
    found = {}
    for path in paths:
        try:
            data = loadmat(path)
        except Exception as exc:  # noqa: BLE001 - scipy raises many kinds for a file that is not a .mat
            raise LabelFileError(path, [f"0: not a readable MATLAB .mat file ({exc})"]) from None
        for key in ("AllImages_release", "AllMOS_release", "AllStdDev_release"):
            if key in data:
                found[key] = (path, np.asarray(data[key]).ravel())
    missing = [k for k in ("AllImages_release", "AllMOS_release", "AllStdDev_release") if k not in found]
    if missing:
        raise UsageError(f"--src: no file holds {', '.join(missing)}; give the release's {SOURCES['clive']}")
    names = [str(np.asarray(x).ravel()[0]) if np.asarray(x).size else "" for x in found["AllImages_release"][1]]
    mos, std = found["AllMOS_release"][1], found["AllStdDev_release"][1]
    if not len(names) == len(mos) == len(std):
        raise UsageError(f"--src: {len(names)} names, {len(mos)} MOS and {len(std)} stds; the three files must be one release's")
    first = LIVE_PRACTICE_IMAGES if len(names) == LIVE_RELEASE_SIZE else 0
    entries, problems = [], []
    for k in range(first, len(names)):
        where = f"entry {k + 1}"
        entries.append({"id": names[k], "mos": number(where, repr(float(mos[k])), problems, *scale, what="MOS"),
                        "std": number(where, repr(float(std[k])), problems, 0, what="std"),
                        "group": None, "split": None, "line": k + 1})
    if problems:
        raise LabelFileError(found["AllMOS_release"][0], problems)
    return entries


def read_entries(dataset, src):
    scale = SCALES[dataset]
    expected = SOURCE_COUNT.get(dataset, 1)
    if len(src) != expected:
        raise UsageError(f"--dataset {dataset} takes {expected} --src file{'s' if expected != 1 else ''}: {SOURCES[dataset]}; got {len(src)}")
    for path in src:
        if not os.path.isfile(path):
            raise UsageError(f"--src {path}: no such file")
    if dataset == "tid2013":
        return tid2013_entries(src[0], src[1], scale)
    if dataset == "clive":
        return live_entries(src, scale)
    path = src[0]
    rows = xlsx_rows(path) if zipfile.is_zipfile(path) else csv_rows(path)
    if len(rows) < 2:
        raise LabelFileError(path, ["0: no data rows after the header"])
    spec = {"koniq10k": dict(id_col="image_name", mos_col="MOS", std_col="SD", set_col="set"),
            "spaq": dict(id_col="Image name", mos_col="MOS"),
            "kadid10k": dict(id_col="dist_img", mos_col="dmos", var_col="var", group_col="ref_img")}[dataset]
    entries, problems = table_entries(path, rows, scale=scale, **spec)
    if problems:
        raise LabelFileError(path, problems)
    return entries


def assign_splits(entries, seed, val_fraction, test_fraction) -> dict:
    """{'train'|'val'|'test': entries}: the official split when every entry has one, else
    a seeded shuffle of the images (or of their groups: the reference photos)."""
    if entries and all(e["split"] for e in entries):
        return {s: [e for e in entries if e["split"] == s] for s in ("train", "val", "test")}
    keys = sorted({e["group"] for e in entries}) if entries[0]["group"] is not None else list(range(len(entries)))
    order = np.random.default_rng(seed).permutation(len(keys))
    n_test, n_val = round(len(keys) * test_fraction), round(len(keys) * val_fraction)
    split_of = {keys[k]: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, k in enumerate(order)}
    key = (lambda k, e: e["group"]) if entries[0]["group"] is not None else (lambda k, e: k)
    out = {"train": [], "val": [], "test": []}
    for k, e in enumerate(entries):
        out[split_of[key(k, e)]].append(e)
    return out


def render(entries, scale, as_distributions) -> tuple:
    """(CSV text, rows whose std was out of reach)."""
    has_std = entries[0]["std"] is not None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not as_distributions:
        writer.writerow(["image_id", "mos", "std"] if has_std else ["image_id", "mos"])
        writer.writerows([e["id"], repr(e["mos"])] + ([repr(e["std"])] if has_std else []) for e in entries)
        return buf.getvalue(), 0
    mos = np.array([e["mos"] for e in entries])
    std = std_to_bins([e["std"] for e in entries], scale) if has_std else None
    result = maxent_distributions(to_bins(mos, scale).clip(1, 10), std)
    writer.writerows([e["id"]] + [f"{p:.8f}" for p in row] for e, row in zip(entries, result.dists))
    return buf.getvalue(), int(result.clipped.sum())


def get_args_parser():
    p = ArgumentParser(description="Convert an image-quality data set's labels into train/val/test CSVs.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", required=True, choices=sorted(SCALES), help="which data set's files --src are")
    p.add_argument("--src", required=True, nargs="+", metavar="FILE", help="its label file(s), as the publisher distributes them")
    p.add_argument("--out_dir", required=True, help="folder for train_labels.csv, val_labels.csv, test_labels.csv")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (data sets without an official one)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of images (or reference photos) for validation")
    p.add_argument("--test_fraction", type=float, default=0.2, help="share of images (or reference photos) for testing")
    p.add_argument("--as_distributions", action="store_true",
                   help="write the maximum-entropy 10-bin distributions (the reference's format) instead of the MOS")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
            raise UsageError("--val_fraction and --test_fraction must be in [0, 1) and leave images for training")
        entries = read_entries(args.dataset, args.src)
        if not entries:
            raise UsageError(f"--src: no images in {', '.join(args.src)}")
        seen, duplicates = {}, []
        for e in entries:
            if e["id"] in seen:
                duplicates.append(f"{e['line']}: duplicate image {show_cell(e['id'])} (first at {seen[e['id']]})")
            seen.setdefault(e["id"], e["line"])
        if duplicates:
            raise LabelFileError(args.src[0], duplicates)
        splits = assign_splits(entries, args.seed, args.val_fraction, args.test_fraction)
        scale, clipped = SCALES[args.dataset], 0
        for name, part in splits.items():
            if not part:
                raise UsageError(f"the {name} split is empty: change --val_fraction/--test_fraction")
            text, n = render(part, scale, args.as_distributions)
            clipped += n
            atomic_write_text(os.path.join(args.out_dir, f"{name}_labels.csv"), text)
    except (UsageError, LabelFileError, OutputWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    official = " (the official split)" if all(e["split"] for e in entries) else ""
    print(f"{args.dataset}: {len(entries)} images -> {args.out_dir}: train {len(splits['train'])}, val {len(splits['val'])}, "
          f"test {len(splits['test'])}{official}")
    if clipped:
        print(f"{clipped} images have a std that 10 bins cannot reach at their MOS; their distributions use the closest reachable std")
    lo, hi = scale
    how = "" if args.as_distributions else f" --label_format mos --score_range {lo:g} {hi:g}"
    print(f"score range {lo:g}..{hi:g}; train with: python main.py --train{how} --train_csv_file "
          f"{os.path.join(args.out_dir, 'train_labels.csv')} --val_csv_file {os.path.join(args.out_dir, 'val_labels.csv')} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
