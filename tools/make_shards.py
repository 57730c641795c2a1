"""Pack images into tar shards in the WebDataset layout, for test.py's sharded path.

    python -m tools.make_shards --src FOLDER --out shards/ --shard_size 10000
    python -m tools.make_shards --csv test_labels.csv --img_path IMAGES --out shards/
    python test.py --model CKPT --test_images 'shards/{000000..000012}.tar' --predictions OUT

Each image becomes one member KEY.EXT holding the file's original bytes (any format;
nothing decoded or re-encoded), so test.py scores it as it would the file. KEY is the
path relative to --src without its extension (with --csv: the CSV's image id), so the
ids of scoring the shards are those of scoring the folder without extensions (the
CSV's ids with --csv). Dots in a key would end it early (a WebDataset key runs to the
first dot of the name), so they become '_'; two files with the same key (a.jpg, a.png)
keep the second as a_png. Shards are numbered 000000.tar, 000001.tar, ... in sorted
path order (the CSV's order with --csv), each written under a temporary name and
renamed: a shard is complete or absent.

Exit codes: 0 all packed; 1 some files could not be read (listed, the rest packed);
2 bad usage (an --out that already holds shards needs --overwrite).
"""
if not __package__:  # run by path (python tools/make_shards.py): run as python -m tools.make_shards
    import _by_path
    _by_path.run_as_module(__file__)

import io
import os
import sys
import tarfile

from dataset.images import find_images
from dataset.label_text import LabelFileError
from dataset.labels import read_label_csv
from engine.flags import ArgumentParser, HelpFormatter
from fileio import OutputWriteError, atomic_path


def get_args_parser():
    p = ArgumentParser(description="Pack images into WebDataset-style tar shards (original bytes kept).",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="folder of images (recursive)")
    src.add_argument("--csv", help="label CSV (image ids, with or without ratings): pack the images it names, in its order")
    p.add_argument("--img_path", help="with --csv: the folder of its images")
    p.add_argument("--out", required=True, help="folder of the shards (created)")
    p.add_argument("--shard_size", type=int, default=10000, help="images per shard")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out (and remove extra ones)")
    p.add_argument("--quiet", action="store_true", help="no per-shard lines")
    return p


def shard_name(n: int) -> str:
    return f"{n:06d}.tar"


def existing_shards(out) -> list:
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n.endswith(".tar") and n[:-4].isdigit())


def members(args) -> list:
    """[(member name, path)] in packing order. Raises ValueError / LabelFileError."""
    if args.src:
        if not os.path.isdir(args.src):
            raise ValueError(f"--src {args.src}: not a folder")
        root, paths = find_images(args.src)
        keyed = [(os.path.splitext(os.path.relpath(p, root))[0], p) for p in paths]
    else:
        if not args.img_path or not os.path.isdir(args.img_path):
            raise ValueError(f"--csv needs --img_path, the folder of its images (got {args.img_path!r})")
        table = read_label_csv(args.csv, args.img_path, require_labels=False, require_images=False)
        keyed = [(i, p) for i, p in zip(table.ids, table.paths)]
    if not keyed:
        raise ValueError(f"--src {args.src}: no image files found" if args.src else f"--csv {args.csv}: no rows")
    out, taken = [], set()
    for key, path in keyed:
        folder, stem = os.path.split(key.replace(os.sep, "/"))
        base = f"{folder}/{stem.replace('.', '_')}" if folder else stem.replace(".", "_")
        ext = os.path.splitext(path)[1].lower() or ".jpg"
        if base in taken:
            base = f"{base}_{ext[1:]}"
        n, unique = 1, base
        while unique in taken:
            n, unique = n + 1, f"{base}_{n}"
        taken.add(unique)
        out.append((unique + ext, path))
    return out


def write_shard(path, batch) -> list:
    """Write one shard atomically; returns [(file, reason)] of the files left out."""
    failed = []
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for name, src in batch:
                try:  # read whole first: a file that shrank meanwhile must not misalign the archive
                    with open(src, "rb") as f:
                        data, mtime = f.read(), os.fstat(f.fileno()).st_mtime
                except OSError as exc:
                    failed.append((src, exc.strerror or str(exc)))
                    continue
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
    return failed


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {args.shard_size}")
        old = existing_shards(args.out)
        if old and not args.overwrite:
            raise ValueError(f"--out {args.out} already holds {len(old)} shard{'s' if len(old) != 1 else ''} ({old[0]}{', ...' if len(old) > 1 else ''}); add --overwrite to "
                             f"replace them, or choose another folder")
        todo = members(args)
    except (ValueError, LabelFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed, count = [], 0
    try:
        os.makedirs(args.out, exist_ok=True)
        for n, start in enumerate(range(0, len(todo), args.shard_size)):
            batch = todo[start:start + args.shard_size]
            failed += write_shard(os.path.join(args.out, shard_name(n)), batch)
            count = n + 1
            if not args.quiet:
                print(f"{os.path.join(args.out, shard_name(n))}: {len(batch)} file{'s' if len(batch) != 1 else ''}")
        for name in old:  # a shorter rerun: no shard of the earlier run is left to be scored with these
            if int(name[:-4]) >= count:
                os.remove(os.path.join(args.out, name))
    except OutputWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = os.path.join(args.out, "{" + f"{0:06d}..{count - 1:06d}" + "}.tar")
    print(f"packed {len(todo) - len(failed)} of {len(todo)} image{'s' if len(todo) != 1 else ''} into {count} "
          f"shard{'s' if count != 1 else ''}; score them with: "
          f"--test_images '{spec}'")
    for src, reason in failed:
        print(f"  left out {src}: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
