"""Score images with a trained NIMA model.

    python test.py --model CKPT --test_csv test.csv --test_images IMAGES --predictions OUT
    python test.py --model CKPT --test_images photo.jpg|folder|'glob/*.png' --predictions OUT

Writes predictions.csv, pred.txt, and with labels metrics.json and scatter.png
(README, "Formats"); with --contact_sheet K also contact_sheet.png.
Exit codes: 0 all scored; 1 some images failed (listed in errors.csv, the rest
written); 2 bad usage or unreadable checkpoint/CSV.
"""
import argparse
import glob
import os
import sys

import torch

from dataset import LabelFileError, find_images, read_label_csv
from dataset.images import DEFAULT_MAX_PIXELS, check_max_pixels
from dataset.labels import LabelTable
from dataset.mos import LABEL_FORMATS, read_mos_csv, resolve_label_flags
from dataset.transforms import check_tta
from engine.checkpoints import recorded_args
from engine.distributed import pick_device
from engine.explain_pictures import parse_explain, write_explanations
from engine.flags import HelpFormatter
from engine.loaders import default_batch_size, default_workers
from engine.predictions import score_and_report
from engine.runtime import UINT8_TRANSFER_CHOICES, Runtime, configure_backends, resolve_speed_flags, resolve_uint8_transfer
from fileio import OutputWriteError
from model import CheckpointError, load_for_inference
from model.checkpoint import NORMALIZE_CHOICES


def get_args_parser():
    p = argparse.ArgumentParser(description="Predict aesthetic score distributions with a NIMA checkpoint.",
                                formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint: ours (epoch-N.pth, best.pth, last.pth) or the reference's released state_dict")
    p.add_argument("--test_csv", default=None, help="label CSV (id + 10 ratings, or ids only); without it every image under --test_images is scored")
    p.add_argument("--test_images", required=True, help="image folder for --test_csv; otherwise one image, a folder (recursive) or a quoted glob")
    p.add_argument("--predictions", default="predictions", help="output folder (files are replaced atomically)")
    p.add_argument("--label_format", choices=LABEL_FORMATS, default=None,
                   help="format of --test_csv: distribution (id + 10 ratings) or mos (image_id,mos[,std]); "
                        "default: the checkpoint's training run's, else distribution")
    p.add_argument("--score_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --label_format mos: the data set's scale (default: the checkpoint's); adds mean_scaled "
                        "to predictions.csv and the metrics on that scale")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: none for a single batch; on a CPU 1 up to 4 cores, "
                        "a quarter of the cores above; on CUDA up to 8)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="network inputs per forward pass, under --tta N: N crops per image (default: 8 on a CPU, 64 on CUDA)")
    p.add_argument("--tta", type=int, default=1, help="average over N fixed crops (centre, 4 corners, then their flips); 1 = centre crop only")
    p.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                   help="for a bare state_dict only (the reference's release format, which does not record it): none for its "
                        "2018-2020 release (epoch-82.pth, assumed by default), imagenet for its June 2021 release (epoch-34.pth); "
                        "our checkpoints record their own")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on for CUDA with bf16)")
    p.add_argument("--channels_last", choices=["auto", "on", "off"], default="auto", help="channels_last memory format (auto: on for CUDA)")
    p.add_argument("--uint8_transfer", choices=UINT8_TRANSFER_CHOICES, default="auto",
                   help="loader workers hand uint8 crops; the device converts and normalises them (auto: on for CUDA)")
    p.add_argument("--gpu_decode", action="store_true",
                   help="decode JPEGs on the device in batches (nvJPEG on CUDA); other files, and JPEGs it refuses, go through Pillow")
    p.add_argument("--contact_sheet", type=int, default=0, metavar="K",
                   help="also write contact_sheet.png: the K highest and K lowest scored images (0: off)")
    p.add_argument("--explain", default="0", metavar="K|all",
                   help="also write explain/<image_id>.png: heat maps of what raises and lowers the predicted mean, for "
                        "the K highest and K lowest scored images, or every image with 'all' (0: off)")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"an image of more than N pixels (width x height) is unreadable, not decoded (default: Pillow's limit, {DEFAULT_MAX_PIXELS})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_inputs(args, score_range=None) -> tuple:
    """(table of images to score, ids to write); a --test_csv of MOS labels when
    score_range is given. Raises LabelFileError / ValueError."""
    if args.test_csv:
        if not os.path.isdir(args.test_images):
            raise ValueError(f"--test_images {args.test_images}: no such folder (with --test_csv it is the folder of the images the CSV names)")
        if score_range is None:
            table = read_label_csv(args.test_csv, args.test_images, require_labels=False, require_images=False)
        else:
            table = read_mos_csv(args.test_csv, args.test_images, score_range, require_labels=False, require_images=False)
        return table, table.ids
    if not os.path.exists(args.test_images) and not glob.has_magic(args.test_images):
        raise ValueError(f"--test_images {args.test_images}: no such file or folder (give an image, a folder or a quoted glob)")
    root, paths = find_images(args.test_images)
    if not paths:
        raise ValueError(f"--test_images {args.test_images!r}: no image files found (looked for {', '.join(('.jpg', '.png', '.webp', '...'))})")
    ids = [os.path.relpath(p, root) for p in paths]
    return LabelTable(csv_path="", ids=ids, paths=paths, lines=[], dists=None), ids


def main(args) -> int:
    try:
        if (args.batch_size is not None and args.batch_size < 1) or (args.workers is not None and args.workers < 0):
            raise ValueError(f"--batch_size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
        check_tta(args.tta)
        if args.contact_sheet < 0:
            raise ValueError(f"--contact_sheet must be >= 0 (0: no contact sheet), got {args.contact_sheet}")
        check_max_pixels(args.max_image_pixels)
        explain = parse_explain(args.explain)
        device = pick_device(args.device)
        _, score_range = resolve_label_flags(args.label_format, args.score_range, recorded_args(args.model))
        table, ids = load_inputs(args, score_range)
        model, model_args = load_for_inference(args.model, device, normalize=args.normalize)
        batch_size = args.batch_size or default_batch_size(device)
        workers = args.workers if args.workers is not None else default_workers(device, len(ids) * args.tta, batch_size)
    except (ValueError, LabelFileError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    amp, channels_last = resolve_speed_flags(args.amp, args.channels_last, device)
    rt = Runtime(device=device, amp=amp, channels_last=channels_last, show_progress=not args.quiet,
                 uint8_transfer=resolve_uint8_transfer(args.uint8_transfer, device),
                 gpu_decode=args.gpu_decode).for_model(model_args)
    configure_backends(rt)  # cudnn.benchmark; IEEE float32 convolutions under --amp off
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        _, errors = score_and_report(model, model_args, table, rt, args.predictions, batch_size=batch_size,
                                     workers=workers, tta=args.tta, ids=ids, contact_sheet=args.contact_sheet,
                                     max_pixels=args.max_image_pixels, score_range=score_range)
        if explain:  # from the predictions.csv just written
            write_explanations(model, model_args, args.predictions, dict(zip(ids, table.paths)), explain, device,
                               args.max_image_pixels, show_progress=not args.quiet)
    except OutputWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
