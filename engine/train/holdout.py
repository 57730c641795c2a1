"""main.py --test: the test split of a training run, scored with the run's best.pth (or
epoch-<warm_start_epoch>.pth under --warm_start alone) through test.py's pipeline, into
<ckpt_path>/test."""
import dataclasses
import os

import torch

from dataset.sources import table_source
from model import load_for_inference
from model.card import print_card, read_card

from engine.runtime import describe_runtime, resolve_speed_flags
from engine.score.collection import score_to_files
from engine.train.setup import read_labels


def score_test_split(args, rt) -> int:
    """Score --test_csv_file and write the prediction files, metrics and scatter.png;
    returns the exit code (1 when some images were unreadable)."""
    name = f"epoch-{args.warm_start_epoch}.pth" if (args.warm_start and not args.train) else "best.pth"
    path = os.path.join(args.ckpt_path, name)
    table = read_labels(args, args.test_csv_file, print, require_labels=False, require_images=False)
    normalize = args.normalize if name != "best.pth" else None
    model, model_args = load_for_inference(path, rt.device, normalize=normalize)
    card = read_card(path, normalize)
    if rt.dist.is_main:
        print_card(card)
    # Scoring, not training: 'auto' picks as test.py's does (bf16 on a CPU that has it, ...).
    amp, channels_last = resolve_speed_flags(args.amp, args.channels_last, rt.device, model_args["base_model"])
    rt = dataclasses.replace(rt, amp=amp, channels_last=channels_last).for_model(model_args)
    if rt.dist.is_main:
        print(describe_runtime(rt, model_args, args.num_workers), flush=True)
    if rt.channels_last:  # as test.py: the inputs are channels_last, so the weights are too
        model = model.to(memory_format=torch.channels_last)
    result = score_to_files(model, model_args, [table_source(table)], rt, os.path.join(args.ckpt_path, "test"),
                            model_path=path, table=table, batch_size=args.test_batch_size, workers=args.num_workers,
                            tta=args.tta, max_pixels=args.max_image_pixels, score_range=args.score_range,
                            contact_sheet=args.contact_sheet, title=f"test set ({path})", card=card)
    return 1 if result is not None and result[2] else 0  # rank 0 reports every rank's unreadable images
