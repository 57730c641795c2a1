"""main.py end to end on tiny data: files written, resume, warm start, flags."""
import json

import pytest
import torch

import main as main_cli
from conftest import run_main, tiny_train_args
from model import build_model, default_model_args


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_two_epochs_write_checkpoints_metrics_and_events(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--decay", "--lr_decay_freq", "1", "--lr_decay_rate", "0.5")) == 0
    records = read_jsonl(ckpt / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "val_emd", "val_srcc_mean", "lr_conv_base", "lr_dense", "seconds", "images_per_second"):
        assert key in records[0]
    # exponential decay by 0.5 every epoch, from the flags' rates, not compounding
    assert records[0]["lr_dense"] == pytest.approx(0.01) and records[1]["lr_dense"] == pytest.approx(0.005)
    assert records[0]["lr_conv_base"] == pytest.approx(0.01) and records[1]["lr_conv_base"] == pytest.approx(0.005)
    best_epochs = [r["epoch"] for r in records if r["val_emd"] == min(x["val_emd"] for x in records[: r["epoch"]])]
    for epoch in best_epochs:
        assert (ckpt / f"epoch-{epoch}.pth").exists()
    assert (ckpt / "best.pth").exists() and (ckpt / "last.pth").exists()
    assert list((ckpt / "tensorboard").glob("events.out.tfevents.*"))
    assert (ckpt / "snapshots" / "curves.png").exists()
    last = torch.load(ckpt / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["model_args"]["base_model"] == "tiny_cnn"
    assert set(last) >= {"model", "optimizer", "scheduler", "epoch", "best_value", "epochs_without_improvement",
                         "args", "model_args", "format_version"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    # best.pth and the early-stopping state, from metrics.jsonl by hand: the last epoch that
    # beat every earlier val_emd, and the epochs since it.
    best_epoch = best_epochs[-1]
    assert torch.load(ckpt / "best.pth", weights_only=True)["epoch"] == best_epoch
    assert last["best_value"] == records[best_epoch - 1]["val_emd"]
    assert last["epochs_without_improvement"] == 2 - best_epoch


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(demo_data, tmp_path):
    flags = ("--decay", "--lr_decay_freq", "1", "--lr_decay_rate", "0.7", "--seed", "3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(tiny_train_args(demo_data, straight, *flags, "--epochs", "3")) == 0
    assert run_main(tiny_train_args(demo_data, split, *flags, "--epochs", "2")) == 0
    assert run_main(tiny_train_args(demo_data, split, *flags, "--epochs", "3", "--resume", split / "last.pth")) == 0
    a, b = (torch.load(d / "last.pth", weights_only=True) for d in (straight, split))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["scheduler"] == b["scheduler"] and a["best_value"] == b["best_value"]
    assert a["epochs_without_improvement"] == b["epochs_without_improvement"]
    # ... and both as counted by hand from the uninterrupted run's validation EMDs.
    emds = [r["val_emd"] for r in read_jsonl(straight / "metrics.jsonl")]
    assert a["best_value"] == min(emds)
    assert a["epochs_without_improvement"] == len(emds) - 1 - emds.index(min(emds))
    assert [r["epoch"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2, 3]
    assert [r["val_emd"] for r in read_jsonl(split / "metrics.jsonl")] == [r["val_emd"] for r in read_jsonl(straight / "metrics.jsonl")]


def test_warm_start_loads_epoch_checkpoint_and_counts_on(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1")) == 0
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "2", "--warm_start", "--warm_start_epoch", "1")) == 0
    # the log keeps the epoch the warm start came from, then goes on from it
    assert [r["epoch"] for r in read_jsonl(ckpt / "metrics.jsonl")] == [1, 2]
    assert torch.load(ckpt / "last.pth", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_early_stopping_with_patience(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    # a zero learning rate on a network without batch norm never improves after epoch 1,
    # so patience 1 stops after epoch 2 (the README's misspelt flag is accepted)
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "5", "--conv_base_lr", "0", "--dense_lr", "0",
                                    "--base_model", "vgg16", "--early_stoppping_patience", "1")) == 0
    assert [r["epoch"] for r in read_jsonl(ckpt / "metrics.jsonl")] == [1, 2]
    last = torch.load(ckpt / "last.pth", weights_only=True)
    assert (last["epoch"], last["epochs_without_improvement"]) == (2, 1)
    assert torch.load(ckpt / "best.pth", weights_only=True)["epoch"] == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(demo_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1")) == 0
    before = (ckpt / "last.pth").read_bytes()
    code = run_main(tiny_train_args(demo_data, ckpt, "--epochs", "3", "--dense_lr", "inf", "--conv_base_lr", "inf"))
    assert code == 1
    assert "loss became" in capsys.readouterr().err
    assert (ckpt / "last.pth").read_bytes() == before


@pytest.mark.parametrize("text,expected", [("true", True), ("False", False), ("0", False), ("yes", True)])
def test_reference_bool_flags_parse_their_value(text, expected):
    args = main_cli.get_args_parser().parse_args(["--warm_start", text, "--multi_gpu", text])
    assert args.warm_start is expected and args.multi_gpu is expected
    assert main_cli.get_args_parser().parse_args(["--warm_start"]).warm_start is True


def test_reference_flags_are_all_accepted():
    args = main_cli.get_args_parser().parse_args(
        "--img_path i --train_csv_file a --val_csv_file b --test_csv_file c --train --test --decay --conv_base_lr 1e-4 "
        "--dense_lr 1e-3 --lr_decay_rate 0.9 --lr_decay_freq 5 --train_batch_size 4 --val_batch_size 4 "
        "--test_batch_size 4 --num_workers 1 --epochs 3 --ckpt_path k --gpu_ids 0 1 --warm_start_epoch 2 "
        "--early_stopping_patience 4 --save_fig --base_model vgg16 --pretrained none --image_size 64 "
        "--resize_size 72 --resume auto --seed 1 --log_dir l".split())
    assert args.early_stopping_patience == 4 and args.gpu_ids == [0, 1] and args.conv_base_lr == 1e-4


def test_defaults_follow_the_reference_readme():
    args = main_cli.get_args_parser().parse_args([])
    assert (args.conv_base_lr, args.dense_lr, args.train_batch_size, args.epochs, args.early_stopping_patience) == (3e-4, 3e-3, 128, 100, 10)
    assert args.pretrained == "imagenet"
    # The model flags are None until resolved (None: not typed); resolved, they are the reference's network.
    from engine.train.setup import resolve_model_args
    assert (args.base_model, args.head, args.dropout) == (None, None, None)
    assert resolve_model_args(args) == {"base_model": "vgg16", "num_classes": 10, "dropout": 0.75, "image_size": 224,
                                        "resize_size": 256, "normalize": "imagenet", "head": "reference"}


def test_unknown_base_model_lists_valid_names(demo_data, tmp_path, capsys):
    assert run_main(tiny_train_args(demo_data, tmp_path / "c", "--base_model", "vgg61")) == 2
    err = capsys.readouterr().err
    assert "vgg61" in err and "vgg16" in err and "tiny_cnn" in err


def test_bad_csv_is_reported_before_training(demo_data, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("demo00000,1,2,3\n")
    args = tiny_train_args(demo_data, tmp_path / "c")
    args[args.index("--train_csv_file") + 1] = str(bad)
    assert run_main(args) == 2
    assert "bad.csv:1: has 4 columns" in capsys.readouterr().err
    assert not (tmp_path / "c" / "last.pth").exists()


def test_offline_imagenet_weights_fail_fast_with_the_alternatives(demo_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    args = tiny_train_args(demo_data, tmp_path / "c", "--base_model", "vgg16")
    args[args.index("--pretrained") + 1] = "imagenet"
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "--pretrained none" in err and "--pretrained PATH" in err


def test_vgg16_head_works_at_small_sizes_with_unchanged_keys():
    model = build_model(default_model_args("vgg16")).eval()
    keys = set(model.state_dict())
    for size in (32, 100):
        out = model(torch.rand(2, 3, size, size))
        assert out.shape == (2, 10) and torch.allclose(out.sum(1), torch.ones(2))
    assert "classifier.1.weight" in keys and len(keys) == 28
    with pytest.raises(ValueError, match="--image_size 16: vgg16 needs at least 32 px"):
        build_model(dict(default_model_args("vgg16"), image_size=16))


def test_channels_last_gives_the_same_output():
    model = build_model(default_model_args("tiny_cnn")).eval()
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, cl, atol=1e-6)


def test_train_then_test_flag_scores_the_test_split_with_best_pth(demo_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = tiny_train_args(demo_data, ckpt, "--test", "--test_csv_file", demo_data / "test_labels.csv", "--epochs", "1")
    assert run_main(args) == 0
    metrics = json.loads((ckpt / "test" / "metrics.json").read_text())
    assert metrics["n"] == 9 and {"srcc_mean", "plcc_mean", "accuracy", "emd", "emd_r1"} <= set(metrics)
    assert (ckpt / "test" / "pred.txt").read_text().count(" | GT: ") == 9
    assert (ckpt / "test" / "scatter.png").exists()
    assert "paper VGG16" in capsys.readouterr().out
