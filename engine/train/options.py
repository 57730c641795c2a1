"""The training flags' values and the checks of the training recipe, importable without
torch: main.py reports a bad flag (exit 2) before anything heavy is imported."""
import math

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
