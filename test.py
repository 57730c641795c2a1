"""Score images with a trained NIMA model.

    python test.py --model CKPT --test_csv_file test.csv --test_images IMAGES --predictions OUT
    python test.py --model CKPT --test_images photo.jpg|folder|'glob/*.png'|'shards/{000000..000099}.tar' ... --predictions OUT
    python test.py --model CKPT --file_list LIST.txt --predictions OUT [--resume] [--output_format parquet]
    torchrun --nproc_per_node=8 test.py ...     (each process scores its share; one merged output)

Results stream into OUT/parts/ as they come (engine/score/collection.py); at the end they are
merged into predictions.csv, pred.txt, and with labels metrics.json and scatter.png
(README, "Formats"); with --contact_sheet K also contact_sheet.png.
Exit codes: 0 all scored; 1 some images failed (listed in errors.csv, the rest
written); 2 bad usage or unreadable checkpoint/CSV.
"""
import os
import sys

# Only torch-free modules here: --help and a usage error answer without importing torch
# (seconds); run() imports the rest.
from dataset import LabelFileError, read_label_csv
from dataset.images import DEFAULT_MAX_PIXELS, check_max_pixels
from dataset.mos import LABEL_FORMATS, read_mos_csv, resolve_label_flags
from dataset.constants import check_tta
from dataset.sources import resolve_specs, table_source
from engine.flags import (PARQUET_HINT, UINT8_TRANSFER_CHOICES, ArgumentParser, HelpFormatter, add_decode_flag, add_decode_flags,
                          add_normalize_flag, add_speed_flags, apply_decode_flags, check_batch_flags, check_threads,
                          parse_explain)
from engine.score.parts import PART_SIZE


def get_args_parser():
    p = ArgumentParser(description="Predict aesthetic score distributions with a NIMA checkpoint.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint: ours (epoch-N.pth, best.pth, last.pth) or the reference's released state_dict")
    p.add_argument("--test_csv_file", "--test_csv", dest="test_csv_file", default=None, help="label CSV (id + 10 ratings, or ids only); without it every image under --test_images is scored")
    p.add_argument("--test_images", nargs="+", default=None, metavar="SPEC",
                   help="image folder for --test_csv_file; otherwise one or more of: an image, a folder (recursive), a quoted "
                        "glob, a tar shard (WebDataset layout: members KEY.jpg, ...), a brace range of shards "
                        "'shards/{000000..000999}.tar' or a quoted glob of .tar files")
    p.add_argument("--file_list", default=None, metavar="LIST",
                   help="a text file of image paths, one per line (relative ones from the list's folder; blank lines and "
                        "# comments skipped); with or instead of --test_images")
    p.add_argument("--predictions", default="predictions",
                   help="output folder: results stream into its parts/ folder, merged at the end into the prediction "
                        "files (each replaced atomically)")
    p.add_argument("--resume", action="store_true",
                   help="keep the results in <predictions>/parts/ of an earlier run of the same command (interrupted, or "
                        "finished with --keep_parts) and score only the images they lack")
    p.add_argument("--keep_parts", action="store_true",
                   help="keep <predictions>/parts/ after the merge (removed by default): the same command with --resume "
                        "then scores only the images added since to its folders or globs")
    p.add_argument("--output_format", choices=["csv", "parquet"], default="csv",
                   help="parquet: also predictions.parquet, the same table (needs pyarrow: requirements-parquet.txt)")
    p.add_argument("--part_size", type=int, default=PART_SIZE, metavar="N",
                   help="results per part file (a part is also written every 10 s): what a kill can lose at most")
    p.add_argument("--dist_timeout", type=int, default=1800,
                   help="under torchrun: seconds a process waits for the others (at the start, and at the end for the "
                        "slowest to finish its share) before the job fails")
    p.add_argument("--label_format", choices=LABEL_FORMATS, default=None,
                   help="format of --test_csv_file: distribution (id + 10 ratings) or mos (image_id,mos[,std]); "
                        "default: the checkpoint's training run's, else distribution")
    p.add_argument("--score_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --label_format mos: the data set's scale (default: the checkpoint's); adds mean_scaled "
                        "to predictions.csv and the metrics on that scale")
    p.add_argument("--num_workers", "--workers", dest="num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: none for a single batch; on a CPU 1 up to 4 cores, "
                        "a quarter of the cores above; on CUDA up to 8)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="network inputs per forward pass, under --tta N: N crops per image (default: 8 on a CPU, 64 on CUDA)")
    p.add_argument("--tta", type=int, default=1, help="average over N fixed crops (centre, 4 corners, then their flips); 1 = centre crop only")
    add_normalize_flag(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_speed_flags(p)
    add_decode_flag(p)
    p.add_argument("--uint8_transfer", choices=UINT8_TRANSFER_CHOICES, default="auto",
                   help="loader workers hand uint8 crops; the device converts and normalises them (auto: on for CUDA)")
    p.add_argument("--gpu_decode", action="store_true",
                   help="decode JPEGs on the device in batches (nvJPEG on CUDA); other files, and JPEGs it refuses, go through Pillow")
    p.add_argument("--contact_sheet", type=int, default=0, metavar="K",
                   help="also write contact_sheet.png: the K highest and K lowest scored images (0: off)")
    p.add_argument("--explain", default="0", metavar="K|all",
                   help="also write explain/<image_id>.png (photo.jpg -> explain/photo.png): heat maps of what raises and lowers the predicted mean, for "
                        "the K highest and K lowest scored images, or every image with 'all' (0: off)")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"an image of more than N pixels (width x height) is unreadable, not decoded (default: Pillow's limit, {DEFAULT_MAX_PIXELS})")
    add_decode_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_flags(args) -> None:
    """Usage errors that need nothing read (ValueError)."""
    check_batch_flags(args)
    check_tta(args.tta)
    if args.contact_sheet < 0:
        raise ValueError(f"--contact_sheet must be >= 0 (0: no contact sheet), got {args.contact_sheet}")
    check_max_pixels(args.max_image_pixels)
    check_threads(args.threads)
    parse_explain(args.explain)
    if args.part_size < 1 or args.dist_timeout < 1:
        raise ValueError(f"--part_size and --dist_timeout must be >= 1, got {args.part_size} and {args.dist_timeout}")
    if not args.test_images and not args.file_list:
        raise ValueError("give --test_images SPEC [SPEC ...] and/or --file_list LIST")
    if args.test_csv_file and (args.file_list or len(args.test_images or ()) != 1):
        raise ValueError("with --test_csv_file, --test_images is the one folder of the CSV's images (and no --file_list)")
    if args.output_format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError(f"--output_format parquet needs pyarrow, which is not installed: {PARQUET_HINT}") from None


def read_table(args, score_range=None):
    """The --test_csv_file table (of MOS labels when score_range is given). Raises
    LabelFileError / ValueError."""
    folder = args.test_images[0]
    if not os.path.isdir(folder):
        raise ValueError(f"--test_images {folder}: no such folder (with --test_csv_file it is the folder of the images the CSV names)")
    if score_range is None:
        return read_label_csv(args.test_csv_file, folder, require_labels=False, require_images=False)
    return read_mos_csv(args.test_csv_file, folder, score_range, require_labels=False, require_images=False)


def collection_inputs(args, score_range=None) -> tuple:
    """(label table or None, sources) of a streaming run."""
    if args.test_csv_file:
        table = read_table(args, score_range)
        return table, [table_source(table)]
    return None, resolve_specs(args.test_images, args.file_list)


def main(args) -> int:
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports usage errors
    try:
        check_flags(args)
        apply_decode_flags(args)  # --decode_timeout, --max_decode_mb: for every decode, in every loader worker
    except ValueError as exc:
        if is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from engine import distributed  # the first import of torch (seconds), after the usage checks
    try:
        dist_info, device = distributed.setup(args.device, args.dist_timeout)
    except ValueError as exc:
        if is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args, dist_info, device)
    finally:
        distributed.cleanup(dist_info)


def run(args, dist_info, device) -> int:
    import torch

    from engine.explain.pictures import write_explanations
    from engine.loaders import default_batch_size
    from engine.runtime import (Runtime, configure_backends, describe_runtime, resolve_speed_flags, resolve_threads,
                                resolve_uint8_transfer)
    from engine.score.collection import collection_workers, score_to_files
    from engine.score.merge import OpenersById
    from engine.score.parts import PartsResumeError
    from engine.score.predictions import read_predictions
    from fileio import OutputWriteError
    from model import CheckpointError, load_for_inference
    from model.card import print_card, read_card
    from model.checkpoint import recorded_args

    try:
        explain = parse_explain(args.explain)
        _, score_range = resolve_label_flags(args.label_format, args.score_range, recorded_args(args.model))
        table, sources = collection_inputs(args, score_range)
        model, model_args = load_for_inference(args.model, device, normalize=args.normalize)
        card = read_card(args.model, args.normalize)
        batch_size = args.batch_size or default_batch_size(device)
        workers = collection_workers(device, sources, args.num_workers, batch_size, args.tta,
                                     peek=len(table) if table is not None else None)
    except (ValueError, LabelFileError, CheckpointError) as exc:
        if dist_info.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if dist_info.is_main:
        print_card(card)  # what the scores will come from, and a toy model's warning
    amp, channels_last = resolve_speed_flags(args.amp, args.channels_last, device, model_args["base_model"])
    rt = Runtime(device=device, amp=amp, channels_last=channels_last, dist=dist_info, show_progress=not args.quiet,
                 uint8_transfer=resolve_uint8_transfer(args.uint8_transfer, device), gpu_decode=args.gpu_decode,
                 jpeg_draft=not args.exact_decode, threads=resolve_threads(args.threads, device)).for_model(model_args)
    configure_backends(rt)  # threads; cudnn.benchmark; IEEE float32 convolutions under --amp off
    if dist_info.is_main:
        print(describe_runtime(rt, model_args, workers), flush=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        result = score_to_files(model, model_args, sources, rt, args.predictions, model_path=args.model, table=table,
                                batch_size=batch_size, workers=workers, tta=args.tta, max_pixels=args.max_image_pixels,
                                resume=args.resume, part_size=args.part_size, score_range=score_range,
                                output_format=args.output_format, contact_sheet=args.contact_sheet,
                                keep_parts=args.keep_parts, card=card)
        if result is None:
            return 0  # rank 0 merged and reports every rank's errors
        ids, openers, errors = result
        if explain:  # from the predictions.csv just written
            rows = read_predictions(os.path.join(args.predictions, "predictions.csv"))
            write_explanations(model, model_args, args.predictions, rows, OpenersById(ids, openers), explain, rt,
                               args.max_image_pixels, show_progress=not args.quiet)
    except (OutputWriteError, PartsResumeError) as exc:
        if rt.dist.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
