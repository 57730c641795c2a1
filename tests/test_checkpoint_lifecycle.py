"""The checkpoint lifecycle (engine/train/checkpoints.py) through main.py: warm start keeps
the checkpoint's schedule position and preprocessing, no checkpoint holds non-finite
weights, and a resume refuses flags that would make its numbers another run's."""
import json
import os
import shutil

import pytest
import torch

from conftest import run_main, run_test, tiny_train_args
from model import build_model, default_model_args


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def lrs(folder):
    return [(r["epoch"], r["lr_conv_base"], r["lr_dense"]) for r in read_jsonl(folder / "metrics.jsonl")]


DECAY = ("--decay", "--lr_decay_freq", "2", "--lr_decay_rate", "0.5", "--conv_base_lr", "0.02", "--dense_lr", "0.04")


@pytest.mark.slow
def test_warm_start_continues_the_decay_schedule_on_the_absolute_epoch(demo_data, tmp_path):
    straight, first, warm = tmp_path / "straight", tmp_path / "first", tmp_path / "warm"
    assert run_main(tiny_train_args(demo_data, straight, *DECAY, "--epochs", "4")) == 0
    # rate ** ((epoch - 1) // freq), written out by hand: epochs 1-2 at the flags' rates, 3-4 halved.
    assert lrs(straight) == [(1, 0.02, 0.04), (2, 0.02, 0.04), (3, 0.01, 0.02), (4, 0.01, 0.02)]
    assert run_main(tiny_train_args(demo_data, first, *DECAY, "--epochs", "2")) == 0
    warm.mkdir()
    shutil.copy(first / "last.pth", warm / "epoch-2.pth")  # the reference's warm start reads epoch-N.pth
    assert run_main(tiny_train_args(demo_data, warm, *DECAY, "--epochs", "4", "--warm_start", "--warm_start_epoch", "2")) == 0
    assert lrs(warm) == [(3, 0.01, 0.02), (4, 0.01, 0.02)]


def test_warm_start_takes_the_checkpoints_model_arguments(demo_data, tmp_path, capsys):
    source, warm = tmp_path / "source", tmp_path / "warm"
    assert run_main(tiny_train_args(demo_data, source, "--epochs", "1", "--normalize", "none", "--dropout", "0.5")) == 0
    warm.mkdir()
    shutil.copy(source / "last.pth", warm / "epoch-1.pth")
    args = tiny_train_args(demo_data, warm, "--epochs", "2", "--warm_start", "--warm_start_epoch", "1")
    # Without --image_size/--resize_size/--normalize/--dropout, the checkpoint's values win over the defaults.
    args = [a for a in args if a not in ("--image_size", "32", "--resize_size", "40")]
    assert run_main(args) == 0
    saved = torch.load(warm / "last.pth", weights_only=True)["model_args"]
    assert (saved["normalize"], saved["dropout"], saved["image_size"], saved["resize_size"]) == ("none", 0.5, 32, 40)
    # A flag that contradicts the checkpoint is an error naming both values.
    assert run_main(args + ["--normalize", "imagenet", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "--normalize imagenet" in err and "'none'" in err


def test_no_checkpoint_ever_holds_non_finite_weights(demo_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code = run_main(tiny_train_args(demo_data, ckpt, "--conv_base_lr", "1e30", "--dense_lr", "1e30",
                                    "--save_every_steps", "1", "--train_batch_size", "2", "--epochs", "1"))
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite" in err or "nan" in err.lower()
    for path in ckpt.glob("*.pth"):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path
    # --resume auto then starts from a finite state (or from scratch), never from NaN weights.
    if (ckpt / "last.pth").exists():
        assert "is intact" in err


def test_resume_refuses_another_monitor_schedule_or_rates(demo_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, *DECAY, "--epochs", "1")) == 0
    resume = ("--resume", ckpt / "last.pth", "--epochs", "2")
    capsys.readouterr()
    for changed, named in [(("--monitor", "val_srcc_mean"), "--monitor: checkpoint val_emd, flags val_srcc_mean"),
                           (("--lr_decay_rate", "0.9"), "learning-rate schedule"),
                           (("--dense_lr", "0.05"), "--dense_lr: checkpoint 0.04, flags 0.05")]:
        args = list(tiny_train_args(demo_data, ckpt, *DECAY, *resume))
        i = args.index(changed[0]) if changed[0] in args else None
        args = args[:i] + args[i + 2:] if i is not None else args
        assert run_main(args + list(changed)) == 2, changed
        assert named in capsys.readouterr().err
    # Harmless changes are printed, and the run goes on.
    assert run_main(tiny_train_args(demo_data, ckpt, *DECAY, *resume, "--early_stopping_patience", "5")) == 0
    assert "--early_stopping_patience 10 -> 5" in capsys.readouterr().out
    assert [r["epoch"] for r in read_jsonl(ckpt / "metrics.jsonl")] == [1, 2]


def test_a_resume_removes_the_half_written_checkpoints_of_a_killed_run(demo_data, tmp_path, capsys):
    """A run killed outright mid-write leaves ".last.pth.<random>.tmp" (the rename never
    came); the next run in that folder removes such files, says so, and touches nothing else."""
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1")) == 0
    partial = [ckpt / ".last.pth.k3j2x9.tmp", ckpt / ".best.pth.a1b2c3.tmp", ckpt / ".epoch-12.pth.zz_9.tmp"]
    kept = [ckpt / ".notes.txt.q1.tmp", ckpt / "last.pth.tmp", ckpt / ".last.pth.tmp.bak", ckpt / "mine.tmp"]
    for path in partial + kept:
        path.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert run_main(tiny_train_args(demo_data, ckpt, "--resume", "auto", "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert [p.name for p in partial if p.exists()] == []
    assert all(str(p) in out for p in partial)
    assert [p.name for p in kept if not p.exists()] == []
    assert torch.load(ckpt / "last.pth", weights_only=True)["epoch"] == 2


def test_resume_needs_the_checkpoints_model_arguments(demo_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1")) == 0
    assert run_main(tiny_train_args(demo_data, ckpt, "--resume", "auto", "--image_size", "48", "--resize_size", "56")) == 2
    assert "--image_size 48 contradicts" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bare_state_dict(tmp_path_factory):
    """A VGG16 NIMA saved as the reference released it: a bare state_dict."""
    torch.manual_seed(0)
    state = build_model(default_model_args("vgg16")).state_dict()
    state["classifier.1.weight"] = state["classifier.1.weight"] * 200
    path = tmp_path_factory.mktemp("released") / "epoch-3.pth"
    torch.save(state, path)
    return path


def one_image_csvs(demo_data, folder):
    """One training and two validation images (a correlation needs two): a VGG16 step on
    CPU stays in seconds."""
    rows = (demo_data / "train_labels.csv").read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text(rows[0] + "\n")
    (folder / "val.csv").write_text(rows[1] + "\n" + rows[2] + "\n")
    return folder / "train.csv", folder / "val.csv"


@pytest.mark.slow
def test_warm_start_from_a_bare_state_dict_records_the_chosen_normalisation(demo_data, bare_state_dict, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(bare_state_dict, ckpt / "epoch-3.pth")
    train_csv, val_csv = one_image_csvs(demo_data, tmp_path / "csv")
    base = ["--train", "--img_path", demo_data / "images", "--train_csv_file", train_csv, "--val_csv_file", val_csv,
            "--ckpt_path", ckpt, "--warm_start", "--warm_start_epoch", "3", "--epochs", "4", "--conv_base_lr", "0",
            "--dense_lr", "0", "--num_workers", "0", "--quiet", "--train_batch_size", "1", "--val_batch_size", "2"]
    assert run_main(base + ["--normalize", "imagenet"]) == 0
    out = capsys.readouterr().out
    assert "assumed --normalize none" not in out  # the flag was given: no note
    saved = torch.load(ckpt / "epoch-4.pth", weights_only=True)
    assert saved["model_args"]["normalize"] == "imagenet" and saved["model_args"]["base_model"] == "vgg16"
    released = torch.load(bare_state_dict, weights_only=True)
    assert all(torch.equal(saved["model"][k], released[k]) for k in released)  # both rates 0: the same weights
    # test.py on the warm-started checkpoint needs no flag, and refuses a contradicting one.
    assert run_test(["--model", ckpt / "epoch-4.pth", "--test_images", demo_data / "images" / "demo00000.jpg",
                     "--predictions", tmp_path / "p", "--workers", "0", "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert run_test(["--model", ckpt / "epoch-4.pth", "--test_images", demo_data / "images" / "demo00000.jpg",
                     "--predictions", tmp_path / "p", "--workers", "0", "--quiet", "--normalize", "none"]) == 2
    assert "contradicts" in capsys.readouterr().err


@pytest.mark.slow
def test_warm_start_from_a_bare_state_dict_keeps_no_normalisation_by_default(demo_data, bare_state_dict, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(bare_state_dict, ckpt / "epoch-3.pth")
    train_csv, val_csv = one_image_csvs(demo_data, tmp_path / "csv")
    assert run_main(["--train", "--img_path", demo_data / "images", "--train_csv_file", train_csv, "--val_csv_file", val_csv,
                     "--ckpt_path", ckpt, "--warm_start", "--warm_start_epoch", "3", "--epochs", "4", "--conv_base_lr", "0",
                     "--dense_lr", "0", "--num_workers", "0", "--quiet", "--train_batch_size", "1", "--val_batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("assumed --normalize none") == 1 and "epoch-34.pth" in out
    assert torch.load(ckpt / "last.pth", weights_only=True)["model_args"]["normalize"] == "none"


def test_a_batch_of_only_unreadable_images_moves_no_weight():
    """With momentum, an optimiser step on zero gradients still moves the weights: a
    batch in which no image could be read must take no step at all."""
    from engine.runtime import Runtime
    from engine.train.epoch import EpochProgress, train_one_epoch
    torch.manual_seed(0)
    args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    model = build_model(args)
    optimizer = torch.optim.SGD(model.param_groups(0.1, 0.1), momentum=0.9)
    target = torch.full((2, 10), 0.1)
    good = {"index": torch.tensor([0, 1]), "image": torch.rand(2, 3, 32, 32), "target": target,
            "ok": torch.tensor([True, True]), "error": ["", ""]}
    bad = {"index": torch.tensor([2, 3]), "image": torch.zeros(2, 3, 32, 32), "target": target,
           "ok": torch.tensor([False, False]), "error": ["truncated image", "zero-byte file"]}
    rt = Runtime(torch.device("cpu"), show_progress=False)
    train_one_epoch(model, [good], optimizer, rt, 1, EpochProgress(), log=lambda *a: None)  # momentum is non-zero now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress = train_one_epoch(model, [bad], optimizer, rt, 1, EpochProgress(), log=lambda *a: None)
    assert progress.skipped == ["2", "3"] and progress.loss_count == 0
    for key, value in model.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(value, before[key]), key


def test_metrics_jsonl_on_a_full_disk_is_a_clear_error_and_keeps_no_partial_line(demo_data, tmp_path, capsys, monkeypatch):
    import errno

    from engine.train import log as run_log
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1")) == 0
    before = (ckpt / "metrics.jsonl").read_text()

    real_fsync = run_log.os.fsync

    def full_disk(fd):  # the appended line is in the file, then the disk turns out full
        if os.readlink(f"/proc/self/fd/{fd}").endswith(os.sep + "metrics.jsonl"):  # not the atomic temporaries
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(run_log.os, "fsync", full_disk)
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "2", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert f"could not write {ckpt / 'metrics.jsonl'}: No space left on device" in err
    assert (ckpt / "metrics.jsonl").read_text() == before  # epoch 1's line only, no partial epoch 2
    assert json.loads(before.splitlines()[-1])["epoch"] == 1
