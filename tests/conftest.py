"""Shared fixtures: a small generated data set and helpers to run the two CLIs in-process."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import main as main_cli  # noqa: E402
import test as test_cli  # noqa: E402
from tools import make_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """60 procedural images (96x72 / 72x96) with train/val/test CSVs of vote counts."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(["--out", str(out), "--num_images", "60", "--seed", "1"])
    return out


def tiny_train_args(data, ckpt, *extra):
    """main.py flags for a fast CPU run on `data` (a make_demo_data folder)."""
    return ["--train", "--img_path", str(data / "images"), "--train_csv_file", str(data / "train_labels.csv"),
            "--val_csv_file", str(data / "val_labels.csv"), "--ckpt_path", str(ckpt),
            "--snapshot_dir", str(ckpt / "snapshots"), "--base_model", "tiny_cnn", "--pretrained", "none",
            "--image_size", "32", "--resize_size", "40", "--train_batch_size", "8", "--val_batch_size", "16",
            "--num_workers", "0", "--conv_base_lr", "0.01", "--dense_lr", "0.01", "--epochs", "2", "--quiet", *extra]


def run_main(argv):
    return main_cli.main(main_cli.get_args_parser().parse_args([str(a) for a in argv]))


def run_test(argv):
    return test_cli.main(test_cli.get_args_parser().parse_args([str(a) for a in argv]))
