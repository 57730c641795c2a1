"""Train NIMA (and evaluate it on a test split).

    python main.py --train --img_path IMAGES --train_csv_file train.csv --val_csv_file val.csv \
        --ckpt_path ckpts --conv_base_lr 3e-4 --dense_lr 3e-3 --decay --epochs 100 --early_stopping_patience 10

Runs on CUDA when present, CPU otherwise; under torchrun it trains with DDP.
Exit codes: 0 done; 1 training failed (non-finite loss, unreadable image under
--strict_images); 2 bad usage or configuration, reported before any heavy work;
130/143 stopped by SIGINT/SIGTERM after saving last.pth.
"""
import os
import sys

# Only torch-free modules here: --help and a usage error answer without importing torch
# (seconds); main() imports the rest once the flags are checked.
from dataset.images import DEFAULT_MAX_PIXELS
from dataset.mos import LABEL_FORMATS
from engine.flags import (SPEED_CHOICES, UINT8_TRANSFER_CHOICES, ArgumentParser, HelpFormatter, add_decode_flag, add_decode_flags,
                          apply_decode_flags, str2bool)
from engine.train.options import MONITORS, OPTIMIZERS, SCHEDULES, check_usage
from model.constants import BACKBONE_NAMES, DEFAULT_BASE_MODEL, DEFAULT_DROPOUT, DEFAULT_HEAD, HEADS, NORMALIZE_CHOICES


def get_args_parser():
    p = ArgumentParser(description="Train NIMA with the Earth Mover's Distance loss.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("data (the reference's flags)")
    g.add_argument("--img_path", default="./data/images/", help="folder of the images named in the CSVs")
    g.add_argument("--train_csv_file", default="./data/train_labels.csv", help="training labels: image id, then 10 vote counts")
    g.add_argument("--val_csv_file", default="./data/val_labels.csv", help="validation labels, same format")
    g.add_argument("--test_csv_file", "--test_csv", dest="test_csv_file", default="./data/test_labels.csv", help="test labels for --test (ratings optional)")
    g.add_argument("--label_format", choices=LABEL_FORMATS, default="distribution",
                   help="distribution: image id + 10 vote counts (AVA); mos: image_id,mos[,std] on the --score_range scale, "
                        "trained on the maximum-entropy distribution with that mean (and std)")
    g.add_argument("--score_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --label_format mos: the data set's scale, mapped linearly onto the ratings 1..10")
    g = p.add_argument_group("what to run")
    g.add_argument("--train", action="store_true", help="train")
    g.add_argument("--test", action="store_true",
                   help="score --test_csv_file with best.pth (or epoch-<warm_start_epoch>.pth under --warm_start without --train)")
    g.add_argument("--tta", type=int, default=1, help="with --test: average over N fixed crops, as test.py's --tta")
    g.add_argument("--contact_sheet", type=int, default=0, metavar="K",
                   help="with --test: also write contact_sheet.png of the K highest and K lowest scored images (0: off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--conv_base_lr", type=float, default=3e-4, help="learning rate of the conv base")
    g.add_argument("--dense_lr", type=float, default=3e-3, help="learning rate of the head")
    g.add_argument("--decay", action="store_true", help="multiply the learning rates by --lr_decay_rate every --lr_decay_freq epochs")
    g.add_argument("--lr_decay_rate", type=float, default=0.95, help="factor of each decay step")
    g.add_argument("--lr_decay_freq", type=int, default=10, help="epochs between decay steps")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (momentum 0.9, the reference's) or adamw")
    g.add_argument("--weight_decay", type=float, default=0.0, help="weight decay of the weight matrices and kernels (not biases or norms)")
    g.add_argument("--lr_schedule", choices=SCHEDULES, default="step",
                   help="step: constant, or with --decay the reference's steps; cosine: --warmup_epochs, then a cosine to 0 at --epochs")
    g.add_argument("--warmup_epochs", type=int, default=0, help="with --lr_schedule cosine: epochs of linear warm-up")
    g.add_argument("--clip_grad_norm", type=float, default=0.0, help="scale the gradients down to at most this norm (0: off)")
    g.add_argument("--freeze_base_epochs", type=int, default=0, metavar="N",
                   help="train only the head for epochs 1..N, then the whole network")
    g.add_argument("--train_batch_size", type=int, default=128, help="per process under torchrun")
    g.add_argument("--val_batch_size", type=int, default=128, help="validation images per forward pass")
    g.add_argument("--test_batch_size", type=int, default=128, help="--test images per forward pass (crops under --tta)")
    g.add_argument("--num_workers", "--workers", dest="num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
    g.add_argument("--epochs", type=int, default=100, help="last epoch to train (counted from 1, across resumes)")
    g.add_argument("--early_stopping_patience", "--early_stoppping_patience", dest="early_stopping_patience",
                   type=int, default=10, help="epochs without improvement of --monitor before stopping")
    g.add_argument("--monitor", default="val_emd", choices=MONITORS, help="validation metric for early stopping and best.pth")
    g.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy, torch, the shuffle and the augmentations")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--ckpt_path", default="./ckpts", help="folder for epoch-N.pth, best.pth, last.pth, metrics.jsonl, curves.png")
    g.add_argument("--resume", default=None, help="PATH of a checkpoint of ours, or 'auto' (last.pth in --ckpt_path if it exists)")
    g.add_argument("--warm_start", type=str2bool, nargs="?", const=True, default=False,
                   help="start a new run from the weights (and model arguments) of epoch-<warm_start_epoch>.pth in --ckpt_path")
    g.add_argument("--warm_start_epoch", type=int, default=0, help="with --warm_start: the epoch to start from")
    g.add_argument("--init_from", default=None, metavar="PATH",
                   help="start a new run (epoch 1, new optimiser) from the weights and model arguments of any checkpoint: "
                        "ours or the reference's released file")
    g.add_argument("--save_every_steps", type=int, default=0, help="also save last.pth every N steps within an epoch (0: off)")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <ckpt_path>/tensorboard)")
    g.add_argument("--snapshot_dir", default=None, help="folder for curves.png (default: --ckpt_path)")
    g.add_argument("--save_fig", action="store_true", help="kept for the reference's users: curves.png is now always saved")
    g.add_argument("--strict_images", action="store_true", help="stop on an unreadable training image instead of skipping it")
    g.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="an image of more than N pixels (width x height) is unreadable, not decoded (default: Pillow's limit)")
    add_decode_flags(g)
    g = p.add_argument_group("model (a resume, warm start or --init_from takes these from its checkpoint)")
    # The model flags default to None: resolve_model_args fills in the defaults, or the
    # checkpoint's values for a resume, warm start or --init_from (None = not typed).
    g.add_argument("--base_model", default=None,
                   help=f"one of: {', '.join(BACKBONE_NAMES)}; or any other torchvision classification model by name "
                        f"(default: {DEFAULT_BASE_MODEL})")
    g.add_argument("--head", choices=HEADS, default=None,
                   help="reference: dropout + Linear(features, 10) + softmax; paper (vgg16 only): keep VGG16's fc6/fc7, "
                        f"replace only the last layer (default: {DEFAULT_HEAD})")
    g.add_argument("--pretrained", default="imagenet", help="imagenet (torchvision's weights), none, or PATH of a torchvision weights file")
    g.add_argument("--image_size", type=int, default=None, help="crop size (default: the backbone's, 224 for vgg16)")
    g.add_argument("--resize_size", type=int, default=None, help="shorter side before cropping (default: the backbone's, 256 for vgg16)")
    g.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                   help="input normalisation (default: the backbone's; for a warm start from a bare state_dict: none, "
                        "the reference's 2018-2020 release; its June 2021 release needs imagenet)")
    g.add_argument("--dropout", type=float, default=None, help=f"dropout before the 10-way layer (default: {DEFAULT_DROPOUT})")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--multi_gpu", type=str2bool, nargs="?", const=True, default=False,
                   help="reference flag: training on several GPUs is now DDP under torchrun; prints the torchrun command to use and exits")
    g.add_argument("--gpu_ids", type=int, nargs="+", default=None, help="with --multi_gpu: the GPUs to use")
    g.add_argument("--dist_timeout", type=int, default=600,
                   help="under torchrun: seconds a rank waits in a collective for the others before the job fails")
    g.add_argument("--amp", choices=SPEED_CHOICES, default="auto",
                   help="bf16 autocast (auto: on CUDA with bf16; training on a CPU stays float32, and --test scores as "
                        "test.py's auto does)")
    g.add_argument("--channels_last", choices=SPEED_CHOICES, default="auto",
                   help="channels_last memory format (auto: on CUDA; on a CPU, off for training and as test.py's auto "
                        "for --test)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--uint8_transfer", choices=UINT8_TRANSFER_CHOICES, default="auto",
                   help="loader workers hand uint8 crops; the device converts and normalises them (auto: on for CUDA)")
    add_decode_flag(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(args) -> int:
    if args.multi_gpu and "WORLD_SIZE" not in os.environ:
        import torch

        from engine import distributed
        # Not started for the user: torchrun owns the worker processes, their restarts and
        # their signals, and the user should see (and keep) the command that does it.
        n = len(args.gpu_ids) if args.gpu_ids else max(torch.cuda.device_count(), 1)
        print(f"--multi_gpu now trains with DistributedDataParallel, one process per GPU. Run:\n"
              f"  {distributed.torchrun_command(sys.argv[0], sys.argv[1:], n, args.gpu_ids)}", file=sys.stderr)
        return 2
    try:
        check_usage(args)
        apply_decode_flags(args)  # --decode_timeout, --max_decode_mb: for every decode of the run, in every worker
    except ValueError as exc:  # UsageError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from engine import distributed  # the first import of torch (seconds), after the usage checks
    from engine.runtime import Runtime, configure_backends, resolve_speed_flags, resolve_uint8_transfer
    from fileio import OutputWriteError
    from model import CheckpointError, PretrainedWeightsError
    try:
        dist_info, device = distributed.setup(args.device, args.dist_timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    amp, channels_last = resolve_speed_flags(args.amp, args.channels_last, device, training=True)
    rt = Runtime(device, amp, channels_last, dist_info, show_progress=not args.quiet,
                 uint8_transfer=resolve_uint8_transfer(args.uint8_transfer, device), jpeg_draft=not args.exact_decode)
    configure_backends(rt)  # cudnn.benchmark; IEEE float32 convolutions under --amp off
    try:
        code = 0
        if args.train:
            code = train(args, rt)
        if args.test and code == 0:
            distributed.barrier(rt.dist)  # every rank must read the best.pth rank 0 has just written
            from engine.train.holdout import score_test_split
            code = score_test_split(args, rt)
        return code
    except (ValueError, PretrainedWeightsError, CheckpointError, OutputWriteError) as exc:  # ValueError: UsageError, ResumeError, LabelFileError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup(dist_info)


def train(args, rt) -> int:
    import torch

    from dataset.labels import shared_images
    from engine import distributed
    from engine.score.inference import evaluate
    from engine.train import epoch as epoch_loop  # epoch_loop.train_one_epoch: looked up per call, as tests wrap it
    from engine.train.card import set_data
    from engine.train.checkpoints import RunCheckpoints, last_good_checkpoint, remove_if_no_checkpoint
    from engine.train.epoch import BadImageError, EpochProgress, NonFiniteLossError, epoch_train_loss
    from engine.train.log import RunLog, epoch_record
    from engine.train.optim import current_lrs, set_base_frozen
    from engine.train.setup import build_run, read_labels, train_loaders
    from engine.train.signals import StopOnSignals, StopRequested
    from fileio import check_writable
    from model.card import finish

    log = print if rt.dist.is_main else (lambda *a, **k: None)
    train_table = read_labels(args, args.train_csv_file, log)
    val_table = read_labels(args, args.val_csv_file, log)
    shared = shared_images(train_table, val_table)
    if shared:  # a warning, not an error: small debugging runs validate on their training CSV
        log(f"warning: {len(shared)} of the {len(val_table)} validation images are also in the training CSV "
            f"(first: {', '.join(shared[:5])}); an overlap inflates every validation figure")
    model, optimizer, scheduler, state, model_args = build_run(args, rt)
    set_data(state.card, vars(args), len(train_table), len(val_table))
    rt = rt.for_model(model_args)  # uint8 batches are normalised on the device as this model expects
    new_folder = not os.path.isdir(args.ckpt_path)
    if rt.dist.is_main:
        check_writable(args.ckpt_path)

    net = torch.compile(model) if args.compile else model  # compile before the DDP wrap
    if rt.dist.enabled:
        # With --freeze_base_epochs the base has no gradients for a while: DDP must not wait for them.
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                                        find_unused_parameters=args.freeze_base_epochs > 0)
    # Validation runs outside the DDP wrapper: its forward would broadcast buffers, a
    # collective that hangs when one rank's shard of the validation set is empty.
    eval_net = net.module if rt.dist.enabled else net
    sampler, train_loader, val_loader = train_loaders(args, rt, model_args, train_table, val_table)
    ckpts, run_log = None, None
    if rt.dist.is_main:
        ckpts = RunCheckpoints(args.ckpt_path, args, model_args, model, optimizer, scheduler)
        run_log = RunLog(args.ckpt_path, args.log_dir or os.path.join(args.ckpt_path, "tensorboard"),
                         args.snapshot_dir or args.ckpt_path, args.monitor, state.epoch)

    def on_step(progress):
        if ckpts is not None and (stop.requested or (args.save_every_steps and progress.steps % args.save_every_steps == 0)):
            ckpts.save_last(state, progress)
        stop.check()

    log(f"training {model_args['base_model']} on {len(train_table)} images, validating on {len(val_table)}, "
        f"{rt.device}{', bf16' if rt.amp else ''}{', channels_last' if rt.channels_last else ''}"
        f"{', compiled' if args.compile else ''}{f', {rt.dist.world_size} processes' if rt.dist.enabled else ''}")
    steps_per_epoch = len(train_loader)
    try:
        with StopOnSignals() as stop:
            first_epoch = state.epoch + 1
            for epoch in range(first_epoch, args.epochs + 1):
                progress = EpochProgress.from_dict(state.partial_epoch)
                sampler.set_epoch(epoch, start=progress.samples)
                # Dropout masks: a function of (seed, epoch, rank), so ranks do not share masks.
                torch.manual_seed(args.seed * 1000 + epoch + 1_000_003 * rt.dist.rank)
                lrs = current_lrs(optimizer)
                frozen = epoch <= args.freeze_base_epochs
                set_base_frozen(model, frozen)
                if args.freeze_base_epochs and epoch in (first_epoch, args.freeze_base_epochs + 1):
                    log(f"epoch {epoch}: " + (f"training the head only, the base frozen through epoch {args.freeze_base_epochs}"
                                              if frozen else "training the whole network"))
                progress = epoch_loop.train_one_epoch(net, train_loader, optimizer, rt, epoch, progress, strict_images=args.strict_images,
                                           paths=train_table.paths, writer=run_log and run_log.writer,
                                           global_step=(epoch - 1) * steps_per_epoch, clip_grad_norm=args.clip_grad_norm,
                                           on_step=on_step, log=print)  # every rank reports the unreadable images of its shard
                train_loss = epoch_train_loss(rt, progress)
                skipped = distributed.gather_union(rt.dist, progress.skipped)
                warned = distributed.gather_union(rt.dist, progress.warned)  # used, but their decoder warned
                distributed.broadcast_buffers(rt.dist, model)  # validate exactly the model rank 0 saves
                val_means = []  # for the model card's percentiles
                val, val_errors = evaluate(eval_net, val_loader, rt, val_table.dists, means=val_means)
                if scheduler is not None:
                    scheduler.step()
                improved = state.end_epoch(epoch, args.monitor, val[args.monitor[len("val_"):]])
                record = epoch_record(epoch, train_loss, val, lrs, progress, rt.dist.world_size, skipped, warned, val_errors, frozen)
                if ckpts is not None:
                    run_log.end_epoch(record)  # before the checkpoints: see MetricsLog
                    ckpts.end_epoch(state, improved, record, val_means)
                log(f"epoch {epoch}: train EMD {train_loss:.4f}  val EMD {val['emd']:.4f}  val SRCC {val['srcc_mean']:.3f}  "
                    f"val acc {val['accuracy']:.3f}  {record['images_per_second']:.1f} img/s"
                    + ("  (best)" if improved else f"  ({state.epochs_without_improvement} without improvement)")
                    + (f"  skipped {len(skipped)} unreadable" if skipped else ""))
                stop.check()  # a signal during validation: last.pth was just saved
                if state.epochs_without_improvement >= args.early_stopping_patience:
                    log(f"early stopping: {args.monitor} has not improved for {args.early_stopping_patience} epochs")
                    break
    except StopRequested as exc:
        last = os.path.join(args.ckpt_path, "last.pth")
        log(f"stopped by signal {exc.signum}; saved {last} (resume with --resume {last})")
        return 128 + exc.signum
    except (NonFiniteLossError, BadImageError) as exc:
        rank = f" (rank {rt.dist.rank})" if rt.dist.enabled else ""
        print(f"error{rank}: {exc}. {last_good_checkpoint(args.ckpt_path)}", file=sys.stderr)
        return 1
    finally:
        if run_log is not None:
            run_log.close()
        if new_folder and rt.dist.is_main:
            remove_if_no_checkpoint(args.ckpt_path)
    log(f"done: best {args.monitor} {state.best_value:.4f}; checkpoints in {args.ckpt_path}")
    warning = finish(state.card)["warning"]
    if warning and not args.test:  # --test says so when it starts
        log(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
