"""A training run's set-up from its flags (main.py): the labels in either format, the model
arguments, and the model, optimiser, schedule and state of a fresh, resumed, warm-started
or --init_from run. Everything that can be wrong with the configuration is found here or
in engine/train/options.py (the recipe's flags, checked before torch is imported), before
any heavy work."""
import random

import numpy as np
import torch

from dataset import EpochShuffleSampler, ImageDataset, ShardSampler, read_label_csv, train_transform
from dataset.mos import clipped_note, read_mos_csv
from model import build_model, default_model_args
from model.card import read_card
from model.nima import DEFAULT_BASE_MODEL, check_model_args

from engine.loaders import make_loader
from engine.score.inference import inference_dataset
from engine.train.checkpoints import (RunState, check_resume_flags, find_resume_checkpoint, load_warm_start, read_init_from,
                          read_warm_start, restore, run_schedule)
from engine.train.card import new_card, resumed_card
from engine.train.optim import build_optimizer, build_scheduler
from engine.train.options import UsageError


# Flags that define the model; a resume, warm start or --init_from takes them from its checkpoint.
MODEL_FLAGS = ("base_model", "head", "dropout", "image_size", "resize_size", "normalize")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_labels(args, csv_path, log=print, **kwargs):
    """A label CSV in the run's --label_format: 10-bin distributions, or a MOS (and std)
    turned into maximum-entropy targets, whose out-of-reach stds are logged."""
    if args.label_format != "mos":
        return read_label_csv(csv_path, args.img_path, **kwargs)
    table = read_mos_csv(csv_path, args.img_path, args.score_range, **kwargs)
    note = clipped_note(table)
    if note:
        log(note)
    return table


def resolve_model_args(args, source=None, source_name="") -> dict:
    """Construction arguments. From a checkpoint (`source`: its model_args) they are the
    checkpoint's, so a run keeps the model and preprocessing it was trained with, and a
    flag the user typed that contradicts one is an error naming both values. Otherwise
    the backbone's defaults with the flags that override them."""
    if source is not None:
        model_args = dict(source)
        model_args.setdefault("head", "reference")  # checkpoints older than --head
        for key in MODEL_FLAGS:
            value = getattr(args, key)
            if value is not None and value != model_args[key]:
                raise UsageError(f"--{key} {value} contradicts {source_name}, whose model has {key} {model_args[key]!r}; "
                                 f"drop the flag (a run started from a checkpoint keeps its model and preprocessing)")
        return model_args
    model_args = default_model_args(args.base_model or DEFAULT_BASE_MODEL)  # raises with the valid names
    for key in ("image_size", "resize_size", "normalize", "dropout", "head"):
        if getattr(args, key) is not None:
            model_args[key] = getattr(args, key)
    if model_args["resize_size"] < model_args["image_size"]:
        raise UsageError(f"--resize_size ({model_args['resize_size']}) must be at least --image_size ({model_args['image_size']})")
    if not 0 <= model_args["dropout"] < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {model_args['dropout']}")
    check_model_args(model_args)  # the backbone's own limits: --head, minimum or fixed --image_size
    return model_args


def build_run(args, rt):
    """The model, optimiser, scheduler and run state of a fresh, resumed, warm-started or
    --init_from run, with its model arguments."""
    log = print if rt.dist.is_main else (lambda *a, **k: None)
    resume_ckpt = find_resume_checkpoint(args)
    source, weights, flag = None, None, None
    if resume_ckpt is not None:
        check_resume_flags(resume_ckpt, args, log)
        model_args = resolve_model_args(args, resume_ckpt["model_args"], resume_ckpt["path"])
        if args.init_from:  # --resume auto after a crash: the run goes on from its own checkpoint
            log(f"--init_from {args.init_from} is not used: resuming {resume_ckpt['path']}")
    elif args.warm_start or args.init_from:
        flag = "--warm_start" if args.warm_start else "--init_from"
        source, weights, source_args, note = read_warm_start(args) if args.warm_start else read_init_from(args)
        if note:
            log(note)
        model_args = resolve_model_args(args, source_args, f"{source} ({flag})")
    else:
        model_args = resolve_model_args(args)
    set_seed(args.seed)
    model = build_model(model_args, pretrained="none" if (resume_ckpt or source) else args.pretrained).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.conv_base_lr, args.dense_lr, rt.device, args.optimizer, args.weight_decay)
    state = RunState()
    if resume_ckpt is not None:
        scheduler = build_scheduler(optimizer, run_schedule(args))
        state = restore(resume_ckpt, model, optimizer, scheduler, rt.dist.rank)
        state.card = resumed_card(resume_ckpt, vars(args), model_args)
        log(f"resumed from epoch {state.epoch}" + (f" (+{state.partial_epoch['steps']} steps)" if state.partial_epoch else ""))
    else:
        if source is not None:
            load_warm_start(model, weights, source, model_args["base_model"], flag)
            state.epoch = args.warm_start_epoch if args.warm_start else 0
            log(f"{flag} {source}: starting at epoch {state.epoch + 1} with a new optimiser")
        # A warm start at epoch N continues the schedule at epoch N + 1's rates.
        scheduler = build_scheduler(optimizer, run_schedule(args), completed_epochs=state.epoch)
        parent = read_card(source, args.normalize) if source is not None else None
        state.card = new_card(vars(args), model_args, parent, source, flag)
    return model, optimizer, scheduler, state, model_args


def train_loaders(args, rt, model_args, train_table, val_table):
    """(training sampler, training loader, validation loader). The training order is a
    function of (seed, epoch), shared across ranks; validation is sharded with no padding."""
    size = model_args["image_size"]
    train_set = ImageDataset.from_table(train_table, train_transform(model_args, uint8=rt.uint8_transfer), (3, size, size),
                                        args.max_image_pixels, draft=rt.jpeg_draft)
    sampler = EpochShuffleSampler(len(train_set), args.seed, rt.dist.world_size, rt.dist.rank)
    # drop_last only under --compile, where a smaller last batch would trigger a recompile.
    train_loader = make_loader(train_set, args.train_batch_size, args.num_workers, rt, sampler=sampler, drop_last=args.compile)
    val_set = inference_dataset(val_table.paths, model_args, val_table.dists, max_pixels=args.max_image_pixels,
                                uint8=rt.uint8_transfer, draft=rt.jpeg_draft)
    val_loader = make_loader(val_set, args.val_batch_size, args.num_workers, rt,
                             sampler=ShardSampler(len(val_set), rt.dist.world_size, rt.dist.rank))
    return sampler, train_loader, val_loader
