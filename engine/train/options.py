"""The training flags' values and the checks of the training recipe, importable without
torch: main.py reports a bad flag (exit 2) before anything heavy is imported."""
import math
import os

from dataset.constants import check_tta
from dataset.mos import check_score_range

HIGHER_IS_BETTER = {"val_srcc_mean", "val_plcc_mean", "val_accuracy", "val_srcc_std", "val_plcc_std"}
LOWER_IS_BETTER = {"val_emd", "val_emd_r1", "val_mae_mean", "val_rmse_mean"}
MONITORS = sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")


class UsageError(ValueError):
    pass


def check_recipe_flags(args) -> None:
    """The labels', optimiser's, schedule's and fine-tuning flags, each error naming its flag."""
    if args.label_format == "mos":
        if args.score_range is None:
            raise UsageError("--label_format mos needs --score_range LO HI: the lowest and highest score of the data "
                             "set's scale (tools/iqa_to_csv.py prints it), mapped onto the ratings 1..10")
        check_score_range(args.score_range)
    elif args.score_range is not None:
        raise UsageError("--score_range goes with --label_format mos (the 10-bin label files need no range)")
    for name in ("weight_decay", "clip_grad_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a number >= 0 (0: off), got {value}")
    if args.warmup_epochs < 0 or args.freeze_base_epochs < 0:
        raise UsageError("--warmup_epochs and --freeze_base_epochs must be >= 0")
    if args.lr_schedule == "cosine":
        if args.decay:
            raise UsageError("--decay (with --lr_decay_rate, --lr_decay_freq) is the step schedule; "
                             "drop it with --lr_schedule cosine, or use --lr_schedule step")
        if args.warmup_epochs >= args.epochs:
            raise UsageError(f"--warmup_epochs {args.warmup_epochs} leaves no epoch for the cosine: "
                             f"it must be below --epochs ({args.epochs})")
    elif args.warmup_epochs:
        raise UsageError("--warmup_epochs goes with --lr_schedule cosine (the step schedule has no warm-up)")
    if args.init_from and args.warm_start:
        raise UsageError("--init_from and --warm_start exclude each other: both start a new run from a checkpoint's "
                         "weights (--warm_start reads epoch-<warm_start_epoch>.pth in --ckpt_path and counts on from it; "
                         "--init_from reads any PATH and starts at epoch 1)")


def check_usage(args) -> None:
    """main.py's flags, each error naming its flag (UsageError, exit 2), before torch is imported."""
    if not (args.train or args.test):
        raise UsageError("nothing to do: pass --train, --test or both")
    for name in ("train_batch_size", "val_batch_size", "test_batch_size", "epochs", "lr_decay_freq"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_workers < 0 or args.save_every_steps < 0 or args.early_stopping_patience < 1:
        raise UsageError("--num_workers and --save_every_steps must be >= 0 and --early_stopping_patience >= 1")
    if args.dist_timeout < 1:
        raise UsageError(f"--dist_timeout must be at least 1 second, got {args.dist_timeout}")
    if args.max_image_pixels < 1:
        raise UsageError(f"--max_image_pixels must be at least 1 (width x height), got {args.max_image_pixels}")
    check_tta(args.tta)
    if args.contact_sheet < 0:
        raise UsageError(f"--contact_sheet must be >= 0 (0: no contact sheet), got {args.contact_sheet}")
    if not os.path.isdir(args.img_path):
        raise UsageError(f"--img_path {args.img_path}: no such folder (it must hold the images the CSVs name)")
    if args.resume and args.warm_start:
        raise UsageError("--resume and --warm_start exclude each other: --resume continues a run of ours, "
                         "--warm_start starts a new one from epoch-<warm_start_epoch>.pth")
    check_recipe_flags(args)
