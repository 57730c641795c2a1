"""Every flag default of main.py, test.py and serve.py, pinned in tables written here: the
values the user documentation gives, and where the reference implementation's README
documents a value, that value. A flag added without an entry here fails, and so does a
default changed in the code alone. Defaults resolved later (from the backbone, the
device or the cores) are checked as resolved, at the edges of their rules."""
import os

import pytest
import torch

import main as main_cli
import serve as serve_cli
import test as test_cli
from engine import loaders
from engine.train.setup import resolve_model_args

PILLOW_PIXEL_LIMIT = 89_478_485  # Pillow's own MAX_IMAGE_PIXELS as shipped: 1024 * 1024 * 1024 // 4 // 3
# The decode limits of every command that decodes (docs/serving.md): 10 s, and 1 GiB, what an
# RGB image at the pixel limit needs at 12 bytes a pixel.
DECODE = {"decode_timeout": 10.0, "max_decode_mb": 1024.0}

# The values the reference implementation's README documents: its training command
# (--conv_base_lr 3e-4 --dense_lr 3e-3 --epochs 100 --early_stoppping_patience 10) and its
# "patience=10". Its argparse had the two learning rates swapped; the README's win.
REFERENCE_README = {"conv_base_lr": 3e-4, "dense_lr": 3e-3, "epochs": 100, "early_stopping_patience": 10}

MAIN = {
    # data
    "img_path": "./data/images/", "train_csv_file": "./data/train_labels.csv", "val_csv_file": "./data/val_labels.csv",
    "test_csv_file": "./data/test_labels.csv", "label_format": "distribution", "score_range": None,
    # what to run
    "train": False, "test": False, "tta": 1, "contact_sheet": 0,
    # optimisation
    "conv_base_lr": 3e-4, "dense_lr": 3e-3, "decay": False, "lr_decay_rate": 0.95, "lr_decay_freq": 10,
    "optimizer": "sgd", "weight_decay": 0.0, "lr_schedule": "step", "warmup_epochs": 0, "clip_grad_norm": 0.0,
    "freeze_base_epochs": 0, "train_batch_size": 128, "val_batch_size": 128, "test_batch_size": 128,
    "num_workers": "min(8, cores)", "epochs": 100, "early_stopping_patience": 10, "monitor": "val_emd", "seed": 0,
    # checkpoints and logs
    "ckpt_path": "./ckpts", "resume": None, "warm_start": False, "warm_start_epoch": 0, "init_from": None,
    "save_every_steps": 0, "log_dir": None, "snapshot_dir": None, "save_fig": False, "strict_images": False,
    "max_image_pixels": PILLOW_PIXEL_LIMIT, **DECODE,
    # model: None until resolved (test_model_flags_resolve_to_vgg16s below)
    "base_model": None, "head": None, "pretrained": "imagenet", "image_size": None, "resize_size": None,
    "normalize": None, "dropout": None,
    # hardware
    "device": "auto", "multi_gpu": False, "gpu_ids": None, "dist_timeout": 600, "amp": "auto", "channels_last": "auto",
    "compile": False, "uint8_transfer": "auto", "exact_decode": False, "quiet": False,
}

TEST = {
    "model": None, "test_csv_file": None, "test_images": None, "file_list": None, "predictions": "predictions",
    "resume": False, "keep_parts": False, "output_format": "csv", "part_size": 5000, "dist_timeout": 1800,
    "label_format": None, "score_range": None, "num_workers": None, "batch_size": None, "tta": 1, "normalize": None,
    "device": "auto", "amp": "auto", "channels_last": "auto", "threads": None, "exact_decode": False,
    "uint8_transfer": "auto", "gpu_decode": False, "contact_sheet": 0, "explain": "0", "max_image_pixels": PILLOW_PIXEL_LIMIT,
    **DECODE, "quiet": False,
}

SERVE = {
    "model": None, "normalize": None, "host": "127.0.0.1", "port": 8000, "device": "auto", "amp": "auto",
    "channels_last": "auto", "exact_decode": False, "max_batch": 32, "max_wait_ms": 5.0, "max_body_mb": 20.0,
    "max_image_pixels": PILLOW_PIXEL_LIMIT, "max_files": 64, "workers": "min(4, cores)", "api_key": None,
    "max_connections": 256, "log_level": "info", **DECODE,
    # the defences against slow, idle and greedy clients (docs/serving.md)
    "max_inflight_mb": 128.0, "queue_timeout": 10.0, "header_timeout": 10.0, "body_timeout": 30.0,
    "min_body_kbps": 16.0, "shutdown_timeout": 30.0,
}


def defaults(parser) -> dict:
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


@pytest.mark.parametrize("cli,table", [(main_cli, MAIN), (test_cli, TEST), (serve_cli, SERVE)],
                         ids=["main.py", "test.py", "serve.py"])
def test_every_flag_default(cli, table):
    got = defaults(cli.get_args_parser())
    assert sorted(got) == sorted(table), "a flag without an entry in this table, or an entry without a flag"
    cores = os.cpu_count() or 1
    resolved = {"min(8, cores)": min(8, cores), "min(4, cores)": min(4, cores)}
    for name, want in table.items():
        want = resolved.get(want, want) if isinstance(want, str) else want
        assert got[name] == want and type(got[name]) is type(want), (name, got[name], want)


def test_the_reference_readmes_values():
    args = main_cli.get_args_parser().parse_args([])
    for name, value in REFERENCE_README.items():
        assert getattr(args, name) == value == MAIN[name], name
    # Its misspelt patience flag sets the same value.
    assert main_cli.get_args_parser().parse_args(["--early_stoppping_patience", "4"]).early_stopping_patience == 4


def test_model_flags_resolve_to_vgg16s():
    """Untyped model flags: VGG16 with the reference's head, dropout 0.75, 224 crops of a
    256 shorter side, ImageNet normalisation."""
    args = main_cli.get_args_parser().parse_args([])
    assert resolve_model_args(args) == {"base_model": "vgg16", "num_classes": 10, "dropout": 0.75, "image_size": 224,
                                        "resize_size": 256, "normalize": "imagenet", "head": "reference"}


@pytest.mark.parametrize("cores,workers", [(1, 1), (2, 2), (8, 8), (9, 8), (64, 8)])
def test_main_num_workers_default_is_min_8_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert main_cli.get_args_parser().parse_args([]).num_workers == workers


@pytest.mark.parametrize("device,batch", [("cpu", 8), ("cuda", 64)])
def test_test_py_batch_size_default(device, batch):
    assert loaders.default_batch_size(torch.device(device)) == batch


@pytest.mark.parametrize("device,cores,items,batch,workers", [
    ("cpu", 2, 8, 8, 0), ("cpu", 2, 9, 8, 1),             # one batch: no worker; one image more: one
    ("cpu", 4, 100, 8, 1), ("cpu", 5, 100, 8, 1), ("cpu", 8, 100, 8, 2), ("cpu", 16, 100, 8, 4),
    ("cpu", 31, 100, 8, 7), ("cpu", 32, 100, 8, 8), ("cpu", 64, 100, 8, 8),
    ("cuda", 2, 64, 64, 0), ("cuda", 2, 65, 64, 2), ("cuda", 8, 100, 64, 8), ("cuda", 9, 100, 64, 8),
])
def test_test_py_workers_default(monkeypatch, device, cores, items, batch, workers):
    """None for a single batch; on a CPU 1 up to 4 cores, a quarter of the cores above (at
    most 8); on CUDA min(8, cores). The cores are those the process may use (its affinity)."""
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert loaders.default_workers(torch.device(device), items, batch) == workers
