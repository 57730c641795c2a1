"""Give a checkpoint percentiles: score a set of photos with it and write a new checkpoint
whose model card holds the quantiles of the predicted means, so that test.py
(predictions.csv), serve.py (POST /score) and the Scorer report each photo's percentile:
the share of this set the model scored lower (docs/model-card.md).

    python -m tools.calibrate --model CKPT --csv LABELS --img_path IMAGES --out NEW
    python -m tools.calibrate --model epoch-34.pth --normalize imagenet --csv val_labels.csv \
        --img_path images --out epoch-34-calibrated.pth

For checkpoints written before training stored percentiles, and for the reference's
released bare state_dicts (--normalize says which release: the new file, a checkpoint of
ours, records it). The photos are scored as test.py scores them (centre crop). With
ratings in the CSV, the set's figures are printed and kept in the card beside the quantiles.
Exit codes: 0 written; 1 written, but some images could not be read (listed), or not
written because fewer than MIN_PERCENTILE_IMAGES could; 2 bad usage, an unreadable
checkpoint or CSV, or a failed write.
"""
if not __package__:  # run by path (python tools/calibrate.py): run as python -m tools.calibrate
    import _by_path
    _by_path.run_as_module(__file__)

import math
import os
import sys

import numpy as np

# Only torch-free modules at the top: --help and a usage error answer without importing
# torch; the functions that need it import the rest.
from dataset.images import DEFAULT_MAX_PIXELS, check_max_pixels
from dataset.mos import LABEL_FORMATS
from engine.flags import ArgumentParser, HelpFormatter, add_normalize_flag, check_batch_flags

KEPT_FIGURES = ("emd", "srcc_mean", "plcc_mean", "accuracy")


def get_args_parser():
    p = ArgumentParser(description="Score a set of photos with a checkpoint and write a copy of it whose model "
                       "card holds the percentiles of its scores.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint: ours or the reference's released state_dict")
    p.add_argument("--csv", required=True, help="the photos to score: a label CSV (id + 10 ratings, or ids only; "
                                                "with --label_format mos, image_id,mos[,std])")
    p.add_argument("--img_path", required=True, help="folder of the images the CSV names")
    p.add_argument("--out", required=True, help="the new checkpoint (a file other than --model; replaced if it exists)")
    add_normalize_flag(p)
    p.add_argument("--label_format", choices=LABEL_FORMATS, default=None,
                   help="format of --csv (default: the checkpoint's training run's, else distribution)")
    p.add_argument("--score_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --label_format mos: the data set's scale (default: the checkpoint's)")
    p.add_argument("--batch_size", type=int, default=None, help="images per forward pass (default: 8 on a CPU, 64 on CUDA)")
    p.add_argument("--num_workers", "--workers", dest="num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: as test.py's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="an image of more than N pixels (width x height) is unreadable, not decoded")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    """Usage errors found before anything is read (ValueError)."""
    check_batch_flags(args)
    check_max_pixels(args.max_image_pixels)
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise ValueError(f"--out {args.out} is --model: write the calibrated checkpoint to a new file, "
                         f"so the original stays as it was")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {args.out}: its folder {folder} does not exist")
    if not os.path.isdir(args.img_path):
        raise ValueError(f"--img_path {args.img_path}: no such folder (it must hold the images --csv names)")


def read_set(args):
    """The --csv table; ValueError when it has fewer rows than percentiles need."""
    from dataset import read_label_csv
    from dataset.mos import read_mos_csv, resolve_label_flags
    from model.card import MIN_PERCENTILE_IMAGES
    from model.checkpoint import recorded_args
    _, score_range = resolve_label_flags(args.label_format, args.score_range, recorded_args(args.model))
    if score_range is None:
        table = read_label_csv(args.csv, args.img_path, require_labels=False, require_images=False)
    else:
        table = read_mos_csv(args.csv, args.img_path, score_range, require_labels=False, require_images=False)
    if len(table) < MIN_PERCENTILE_IMAGES:
        raise ValueError(f"--csv {args.csv} has {len(table)} image(s); percentiles need at least "
                         f"{MIN_PERCENTILE_IMAGES} (use a larger set, ideally the model's validation set)")
    return table


def calibrated(ckpt, card, model_args) -> dict:
    """The new checkpoint: ours with the card replaced, or a bare state_dict as one of ours
    (weights, model_args with the release's normalisation, card)."""
    from model import strip_wrapper_prefixes
    from model.checkpoint import is_released_state_dict
    if is_released_state_dict(ckpt):
        return {"model": strip_wrapper_prefixes(ckpt), "model_args": dict(model_args), "card": card}
    return dict(ckpt, card=card)


def score_set(model, model_args, table, device, args) -> tuple:
    """(row indices, (N, 10) distributions, [(path, reason)]) of the table's images, scored
    as test.py scores them: the same loader, test.py's default speed flags and decoding."""
    import torch
    from tqdm import tqdm

    from dataset.sources import table_source
    from engine.loaders import default_batch_size, default_workers
    from engine.runtime import Runtime, resolve_speed_flags, resolve_uint8_transfer
    from engine.score.collection import collection_loader, scored_rows
    amp, channels_last = resolve_speed_flags("auto", "auto", device, model_args["base_model"])
    rt = Runtime(device, amp, channels_last, show_progress=not args.quiet, jpeg_draft=True,
                 uint8_transfer=resolve_uint8_transfer("auto", device)).for_model(model_args)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = args.batch_size or default_batch_size(device)
    workers = args.num_workers if args.num_workers is not None else default_workers(device, len(table), batch_size)
    loader = collection_loader([table_source(table)], model_args, rt, batch_size, workers, max_pixels=args.max_image_pixels)
    indices, dists, failures = [], [], []
    batches = -(-len(table) // batch_size)  # the loader streams: its length is the table's, in batches
    for rows in tqdm(scored_rows(model, loader, rt), desc="calibrate", total=batches, disable=not rt.progress,
                     dynamic_ncols=True, leave=False):
        for ref, _, _, order, status, text, dist in rows:
            if status == "ok":
                indices.append(order)
                dists.append(dist)
            else:
                failures.append((ref, text))
    order = np.argsort(indices, kind="stable")  # the CSV's row order
    return [indices[k] for k in order], np.asarray(dists, dtype=np.float64).reshape(-1, 10)[order], failures


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from dataset import LabelFileError  # the first import of torch (seconds), after the usage checks
    from engine.distributed import pick_device
    from engine.metrics import compute_metrics, format_table, mean_and_std
    from model import CheckpointError, load_for_inference, save_checkpoint
    from model.card import MIN_PERCENTILE_IMAGES, card_from_checkpoint, finish, now, print_card, quantiles_of
    from model.checkpoint import read_checkpoint_file
    try:
        table = read_set(args)
        device = pick_device(args.device)
        model, model_args = load_for_inference(args.model, device, normalize=args.normalize)
        ckpt = read_checkpoint_file(args.model)
        card = card_from_checkpoint(ckpt, args.model, args.normalize)
    except (ValueError, LabelFileError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_card(card)
    indices, dists, failures = score_set(model, model_args, table, device, args)
    for ref, reason in failures[:10]:
        print(f"  unreadable: {ref}: {reason}", file=sys.stderr)
    if len(indices) < MIN_PERCENTILE_IMAGES:
        print(f"error: only {len(indices)} of the {len(table)} images of {args.csv} could be read; percentiles need "
              f"at least {MIN_PERCENTILE_IMAGES}: nothing written", file=sys.stderr)
        return 1
    means = mean_and_std(dists)[0]
    percentiles = {"quantiles": quantiles_of(means), "images": len(indices), "csv": os.path.basename(args.csv),
                   "set": "calibration", "date": now()}
    if table.dists is not None:
        metrics = compute_metrics(dists, np.asarray(table.dists)[indices])
        print(format_table(metrics))
        percentiles.update({k: metrics[k] for k in KEPT_FIGURES if math.isfinite(metrics[k])})  # NaN: left out
    card.update(percentiles=percentiles, date=now())
    try:
        save_checkpoint(args.out, calibrated(ckpt, finish(card), model_args))
    except (OSError, CheckpointError) as exc:  # OutputWriteError included
        print(f"error: could not write --out {args.out}: {exc}", file=sys.stderr)
        return 2
    q = percentiles["quantiles"]
    print(f"wrote {args.out}: percentiles from {len(indices)} images of {args.csv} (predicted means: 10th percentile "
          f"{q[10]:.3f}, median {q[50]:.3f}, 90th {q[90]:.3f})")
    if failures:
        print(f"{len(failures)} of the {len(table)} images could not be read and are left out", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
