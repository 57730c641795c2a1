"""Fine-tuning and training recipes through main.py: --init_from (a released-format
checkpoint and one of ours), --freeze_base_epochs, --optimizer adamw, --lr_schedule
cosine with --warmup_epochs, --weight_decay, --clip_grad_norm, and resumes that must
match them."""
import json
import math

import pytest
import torch

from conftest import run_main, tiny_train_args
from engine.train import epoch as epoch_loop
from engine.train.signals import StopRequested
from model import build_model, default_model_args


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def parameter_names(model_args):
    """The learnable tensors (BatchNorm's running statistics are buffers, not weights)."""
    return {name for name, _ in build_model(model_args).named_parameters()}


def same(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A VGG16 NIMA saved as the reference released it: a bare state_dict."""
    torch.manual_seed(0)
    state = build_model(default_model_args("vgg16")).state_dict()
    path = tmp_path_factory.mktemp("released") / "epoch-82.pth"
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_init_from_a_released_checkpoint_freezes_the_base_for_one_epoch(demo_data, released, tmp_path, capsys):
    # One training and two validation images: VGG16 steps on CPU stay in seconds.
    rows = (demo_data / "train_labels.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text(rows[0] + "\n")
    (tmp_path / "val.csv").write_text(rows[1] + "\n" + rows[2] + "\n")
    ckpt = tmp_path / "ckpt"
    args = ["--train", "--img_path", demo_data / "images", "--train_csv_file", tmp_path / "train.csv",
            "--val_csv_file", tmp_path / "val.csv", "--ckpt_path", ckpt, "--init_from", released, "--resume", "auto",
            "--freeze_base_epochs", "1", "--conv_base_lr", "1e-3", "--dense_lr", "1e-3", "--num_workers", "0",
            "--quiet", "--train_batch_size", "1", "--val_batch_size", "2"]
    assert run_main(args + ["--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "assumed --normalize none" in out and "starting at epoch 1" in out and "training the head only" in out
    source = torch.load(released, weights_only=True)
    base = {k for k in source if k.startswith("features.")}
    first = torch.load(ckpt / "last.pth", weights_only=True)
    assert first["epoch"] == 1 and first["model_args"]["base_model"] == "vgg16" and first["model_args"]["normalize"] == "none"
    assert same(first["model"], source, base)                                       # the base did not move
    assert not torch.equal(first["model"]["classifier.1.weight"], source["classifier.1.weight"])  # the head did
    # The same command again (--resume auto) goes on from last.pth, not from --init_from, into epoch 2: all trains.
    assert run_main(args + ["--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "is not used: resuming" in out and "training the whole network" in out
    second = weights(ckpt / "last.pth")
    assert all(not torch.equal(second[k], first["model"][k]) for k in base if k.endswith("weight"))
    assert [r["base_frozen"] for r in read_jsonl(ckpt / "metrics.jsonl")] == [True, False]


def test_init_from_a_checkpoint_that_does_not_fit_is_a_clear_error(demo_data, released, tmp_path, capsys):
    source = tmp_path / "source"
    assert run_main(tiny_train_args(demo_data, source, "--epochs", "1")) == 0
    # A typed --base_model other than the checkpoint's names both.
    assert run_main(tiny_train_args(demo_data, tmp_path / "a", "--init_from", released, "--epochs", "1")) == 2
    assert "--base_model tiny_cnn contradicts" in capsys.readouterr().err
    # Weights of another shape for the same backbone name: the loader's mismatch, with the flag and file.
    broken = torch.load(source / "last.pth", weights_only=True)
    broken["model"]["classifier.1.weight"] = torch.zeros(10, 7)
    torch.save(broken, tmp_path / "broken.pth")
    assert run_main(tiny_train_args(demo_data, tmp_path / "b", "--init_from", tmp_path / "broken.pth")) == 2
    err = capsys.readouterr().err
    assert "--init_from" in err and "broken.pth does not fit a tiny_cnn NIMA" in err
    assert run_main(tiny_train_args(demo_data, tmp_path / "c", "--init_from", source / "last.pth", "--warm_start")) == 2
    assert "--init_from and --warm_start exclude each other" in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_one_of_ours_then_freeze_the_base(demo_data, tmp_path, capsys):
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    assert run_main(tiny_train_args(demo_data, source, "--epochs", "3", "--normalize", "none")) == 0
    base_lr = ("--conv_base_lr", "0.02", "--dense_lr", "0.02")
    args = tiny_train_args(demo_data, tuned, "--init_from", source / "best.pth", "--freeze_base_epochs", "1",
                           "--epochs", "3", *base_lr)
    # Without --normalize the checkpoint's model arguments win over the backbone's defaults.
    assert run_main(args) == 0
    start = weights(source / "best.pth")
    names = parameter_names(torch.load(source / "best.pth", weights_only=True)["model_args"])
    base = {k for k in names if k.startswith("features.")}
    records = read_jsonl(tuned / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and [r["base_frozen"] for r in records] == [True, False, False]
    after_1 = weights(tuned / "epoch-1.pth")  # a first epoch always improves on nothing: it is saved
    assert same(after_1, start, base) and not same(after_1, start, names - base)
    last = torch.load(tuned / "last.pth", weights_only=True)
    assert last["model_args"]["normalize"] == "none"
    assert not same(last["model"], start, base)                                      # trained after epoch 1
    with capsys.disabled():  # the figures the README quotes
        print("\nfine-tuning on the demo set (tiny_cnn from a 3-epoch run, base frozen in epoch 1):")
        for r in [{"epoch": 0, **{k: v for k, v in read_jsonl(source / "metrics.jsonl")[-1].items() if k.startswith("val_")}}] + records:
            print(f"  epoch {r['epoch']}: val EMD {r['val_emd']:.4f}  SRCC {r['val_srcc_mean']:.3f}  LCC {r['val_plcc_mean']:.3f}"
                  f"  accuracy {r['val_accuracy']:.3f}" + ("  (the source run's last epoch)" if r["epoch"] == 0 else ""))
    assert all(math.isfinite(r["val_emd"]) for r in records)


@pytest.mark.slow
def test_the_base_stays_put_through_a_frozen_epoch_whatever_the_optimiser(demo_data, tmp_path):
    """Epoch 1 frozen, epoch 2 not: the base's weights from last.pth after each, for SGD
    with momentum and weight decay, and for AdamW (whose state would move them)."""
    for optimizer in ("sgd", "adamw"):
        ckpt = tmp_path / optimizer
        flags = ("--freeze_base_epochs", "1", "--optimizer", optimizer, "--weight_decay", "0.1", "--resume", "auto")
        assert run_main(tiny_train_args(demo_data, ckpt, *flags, "--epochs", "1", "--seed", "5")) == 0
        first = torch.load(ckpt / "last.pth", weights_only=True)
        names = parameter_names(first["model_args"])
        base = {k for k in names if k.startswith("features.")}
        torch.manual_seed(5)  # the fresh model main.py built under --seed 5, before any step
        start = build_model(first["model_args"]).state_dict()
        assert same(first["model"], start, base) and not same(first["model"], start, names - base), optimizer
        assert run_main(tiny_train_args(demo_data, ckpt, *flags, "--epochs", "2", "--seed", "5")) == 0
        second = weights(ckpt / "last.pth")
        assert all(not torch.equal(second[k], start[k]) for k in base), optimizer


def lrs(folder):
    return [rate for r in read_jsonl(folder / "metrics.jsonl") for rate in (r["lr_conv_base"], r["lr_dense"])]


COSINE = ("--optimizer", "adamw", "--lr_schedule", "cosine", "--warmup_epochs", "1", "--weight_decay", "0.01",
          "--clip_grad_norm", "1.0", "--conv_base_lr", "0.002", "--dense_lr", "0.004")


@pytest.mark.slow
def test_adamw_cosine_with_warmup_follows_the_schedule_and_resumes_exactly(demo_data, tmp_path, monkeypatch, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(tiny_train_args(demo_data, straight, *COSINE, "--epochs", "4")) == 0
    # Written out by hand: epoch 1 at half the rate (warm-up of 1 epoch), then 0.5 (1 + cos(pi k / 3)), k = 0, 1, 2.
    factors = [0.5, 1.0, 0.75, 0.25]
    assert lrs(straight) == pytest.approx([rate for f in factors for rate in (0.002 * f, 0.004 * f)])
    saved = torch.load(straight / "last.pth", weights_only=True)
    assert saved["schedule"] == {"kind": "cosine", "epochs": 4, "warmup_epochs": 1}
    assert all("exp_avg" in s for s in saved["optimizer"]["state"].values())  # AdamW's state
    # Weight decay on the weight matrices and kernels only.
    decays = {g["weight_decay"] for g in saved["optimizer"]["param_groups"]}
    assert decays == {0.01, 0.0} and len(saved["optimizer"]["param_groups"]) == 4

    # Stopped before epoch 3 (as by a signal), then resumed: the same rates and weights as the straight run.
    real = epoch_loop.train_one_epoch  # main.py calls it through the module, so a patch there takes

    def stop_at_epoch_3(net, loader, optimizer, rt, epoch, *a, **k):
        if epoch == 3:
            raise StopRequested(15)
        return real(net, loader, optimizer, rt, epoch, *a, **k)

    monkeypatch.setattr(epoch_loop, "train_one_epoch", stop_at_epoch_3)
    assert run_main(tiny_train_args(demo_data, split, *COSINE, "--epochs", "4")) == 143
    monkeypatch.setattr(epoch_loop, "train_one_epoch", real)
    resume = tiny_train_args(demo_data, split, *COSINE, "--epochs", "4", "--resume", "auto")
    assert run_main(resume) == 0
    assert lrs(split) == lrs(straight)
    a, b = weights(straight / "last.pth"), weights(split / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()

    # A resume with another schedule, optimiser, decay or clipping is refused, naming both values.
    for changed, named in [(("--lr_schedule", "step", "--warmup_epochs", "0"), "learning-rate schedule: checkpoint --lr_schedule cosine"),
                           (("--epochs", "6"), "over --epochs 4, flags --lr_schedule cosine --warmup_epochs 1 over --epochs 6"),
                           (("--optimizer", "sgd"), "--optimizer: checkpoint adamw, flags sgd"),
                           (("--weight_decay", "0.05"), "--weight_decay: checkpoint 0.01, flags 0.05"),
                           (("--clip_grad_norm", "0"), "--clip_grad_norm: checkpoint 1.0, flags 0.0")]:
        args = list(tiny_train_args(demo_data, split, *COSINE, "--epochs", "4", "--resume", split / "last.pth"))
        for flag, value in zip(changed[::2], changed[1::2]):
            args[len(args) - 1 - args[::-1].index(flag) + 1] = value  # the last occurrence is the one in effect
        assert run_main(args) == 2, changed
        err = capsys.readouterr().err
        assert named in err and "--init_from" in err, (changed, err)


def test_recipe_flags_are_checked_before_any_work(demo_data, tmp_path, capsys):
    for extra, message in [(("--lr_schedule", "cosine", "--decay"), "--decay (with --lr_decay_rate, --lr_decay_freq) is the step schedule"),
                           (("--warmup_epochs", "1"), "--warmup_epochs goes with --lr_schedule cosine"),
                           (("--lr_schedule", "cosine", "--warmup_epochs", "2"), "--warmup_epochs 2 leaves no epoch for the cosine"),
                           (("--weight_decay", "-1"), "--weight_decay must be a number >= 0"),
                           (("--clip_grad_norm", "nan"), "--clip_grad_norm must be a number >= 0"),
                           (("--label_format", "mos"), "--label_format mos needs --score_range LO HI"),
                           (("--score_range", "1", "5"), "--score_range goes with --label_format mos"),
                           (("--label_format", "mos", "--score_range", "5", "5"), "--score_range 5 5: LO must be below HI")]:
        assert run_main(tiny_train_args(demo_data, tmp_path / "c", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "c").exists()


def test_clip_grad_norm_bounds_each_step():
    """With plain SGD at rate 1, a step moves the weights by exactly the gradient: clipped
    to norm c, the whole step has norm at most c; unclipped, it is far larger."""
    from engine.runtime import Runtime
    from engine.train.epoch import EpochProgress, train_one_epoch
    args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    batch = {"index": torch.tensor([0, 1]), "image": torch.rand(2, 3, 32, 32), "target": torch.eye(10)[[0, 9]],
             "ok": torch.tensor([True, True]), "error": ["", ""]}
    rt = Runtime(torch.device("cpu"), show_progress=False)
    moved = {}
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        model = build_model(args)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        train_one_epoch(model, [batch], optimizer, rt, 1, EpochProgress(), clip_grad_norm=clip, log=lambda *a: None)
        moved[clip] = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))
    assert moved[1e-3] <= 1e-3 * (1 + 1e-4) and moved[0.0] > 10 * 1e-3


def _ddp_freeze_worker(rank, port, result):
    import os
    import torch.distributed as dist
    from engine.train.optim import base_parameters, build_optimizer, set_base_frozen
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40))
    optimizer = build_optimizer(model, 0.1, 0.1, torch.device("cpu"), "adamw", 0.1)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # as main.py under a freeze
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    moved = []
    for frozen in (True, False):
        set_base_frozen(model, frozen)
        for step in range(2):
            torch.manual_seed(rank * 100 + step)  # each rank its own batch
            optimizer.zero_grad(set_to_none=True)
            net(torch.rand(4, 3, 32, 32)).pow(2).sum().backward()
            optimizer.step()
        moved.append(sum(not torch.equal(v, start[k]) for k, v in model.named_parameters() if k.startswith("features.")))
    head = model.classifier[1].weight.detach().clone()
    heads = [torch.zeros_like(head) for _ in range(2)]
    dist.all_gather(heads, head)
    result[rank] = (moved, torch.equal(heads[0], heads[1]), len(list(base_parameters(model))))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.subprocess
def test_freezing_under_ddp_moves_no_base_weight_and_keeps_replicas_equal():
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_ddp_freeze_worker, args=(port, result), nprocs=2)
    for rank in (0, 1):
        (frozen_moved, unfrozen_moved), equal, n_base = result[rank]
        assert frozen_moved == 0 and unfrozen_moved == n_base and equal
