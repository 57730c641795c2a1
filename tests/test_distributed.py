"""DistributedDataParallel through torchrun, on CPU with gloo and 2 processes: one set of
outputs, validation and test metrics equal to a single-process evaluation, resume,
elastic restart after a SIGKILL, a failing rank ends the job, a hung rank times out,
and the reference's --multi_gpu flag.

Each torchrun job starts three Python processes on a 2-core machine, so the jobs are
few and tiny (tiny_cnn, 32 px) and every subprocess has a timeout: a hang fails the
test instead of blocking the suite."""
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main as main_cli
from conftest import ROOT, run_main, run_test, stop_job, tiny_train_args, worker_with_rank
from dataset import read_label_csv
from engine import distributed
from engine.score.inference import evaluate, inference_dataset
from engine.loaders import make_loader
from engine.runtime import Runtime
from model import load_for_inference
from tools import make_demo_data

MAIN = os.path.join(ROOT, "main.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
JOB_TIMEOUT_S = 180  # a 2-epoch job takes 10-30 s on 2 busy cores; a hang fails at this bound


def job_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def ddp_args(data, ckpt, *extra):
    # --device cpu: gloo even where a GPU exists (two ranks cannot share one GPU under NCCL).
    return [str(a) for a in tiny_train_args(data, ckpt, "--device", "cpu", "--dist_timeout", "60", *extra)]


def torchrun(args, *launcher_flags, timeout=JOB_TIMEOUT_S):
    return subprocess.run([*TORCHRUN, *launcher_flags, MAIN, *args], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(ckpt):
    with open(ckpt / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def improved_epochs(records):
    best, out = float("inf"), []
    for r in records:
        if r["val_emd"] < best:
            best = r["val_emd"]
            out.append(r["epoch"])
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def single_process_val_metrics(ckpt_file, data):
    """The project's own evaluation of a checkpoint on the validation CSV, in this
    (non-distributed) process."""
    model, model_args = load_for_inference(ckpt_file)
    table = read_label_csv(data / "val_labels.csv", data / "images")
    rt = Runtime(torch.device("cpu"), show_progress=False)
    loader = make_loader(inference_dataset(table.paths, model_args, table.dists), 16, 0, rt)
    metrics, errors = evaluate(model, loader, rt, table.dists)
    assert not errors
    return metrics


def assert_same_metrics(expected: dict, got: dict, prefix=""):
    for key, value in expected.items():
        assert np.isclose(got[prefix + key], value, rtol=0, atol=1e-5, equal_nan=True), (key, got[prefix + key], value)


@pytest.fixture(scope="module")
def ddp_run(demo_data, tmp_path_factory):
    """One 2-process job: 2 epochs of training, then --test on best.pth."""
    ckpt = tmp_path_factory.mktemp("ddp") / "ckpt"
    proc = torchrun(ddp_args(demo_data, ckpt, "--test", "--test_csv_file", demo_data / "test_labels.csv"))
    return ckpt, proc


@pytest.mark.subprocess
@pytest.mark.slow
def test_ddp_run_writes_one_set_of_outputs(ddp_run):
    ckpt, proc = ddp_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(ckpt)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["val_n"] == 9
    # Only rank 0 writes: no rank-suffixed copies, no second metrics log, no leftover temporary file.
    files = {p.name for p in ckpt.iterdir() if p.is_file()}
    assert files == {"best.pth", "last.pth", "metrics.jsonl"} | {f"epoch-{e}.pth" for e in improved_epochs(records)}
    assert len(list((ckpt / "tensorboard").iterdir())) == 1
    assert [p.name for p in (ckpt / "snapshots").iterdir()] == ["curves.png"]
    # Only rank 0 logs.
    assert proc.stdout.count("2 processes") == 1 and proc.stdout.count("epoch 2:") == 1
    for name in files - {"metrics.jsonl"}:
        keys = list(load(ckpt / name)["model"])
        assert keys and not any("module." in k or "_orig_mod." in k for k in keys), name
    assert load(ckpt / "last.pth")["epoch"] == 2
    # The model card: rank 0's, with the gathered validation figures of the best epoch.
    card, best = load(ckpt / "best.pth")["card"], min(records, key=lambda r: r["val_emd"])
    assert card["epochs"] == best["epoch"] and card["best"]["epoch"] == best["epoch"]
    assert card["best"]["val_srcc_mean"] == best["val_srcc_mean"] and card["val_csv"]["rows"] == 9


@pytest.mark.subprocess
def test_ddp_metrics_equal_single_process_evaluation(ddp_run, demo_data, tmp_path):
    ckpt, proc = ddp_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Validation: each rank scored its shard; the gathered metrics are those of one process.
    assert_same_metrics(single_process_val_metrics(ckpt / "last.pth", demo_data), read_metrics(ckpt)[-1], "val_")
    # --test after training: every rank scored rank 0's final best.pth, as test.py does alone.
    out = tmp_path / "pred"
    assert run_test(["--model", ckpt / "best.pth", "--test_csv", demo_data / "test_labels.csv", "--test_images",
                     demo_data / "images", "--predictions", out, "--workers", "0", "--quiet"]) == 0
    single = json.loads((out / "metrics.json").read_text())
    ddp = json.loads((ckpt / "test" / "metrics.json").read_text())
    assert ddp.keys() == single.keys() and ddp["n"] == 9
    assert ddp.pop("model_args") == single.pop("model_args")
    assert ddp.pop("card") == single.pop("card")  # best.pth's model card, as test.py reads it
    assert_same_metrics(single, ddp)
    ddp_rows, single_rows = (list(csv.reader(f.read_text().splitlines()))
                             for f in (ckpt / "test" / "predictions.csv", out / "predictions.csv"))
    assert [r[0] for r in ddp_rows] == [r[0] for r in single_rows]  # same images, same order
    assert ddp_rows[0][-1] == "percentile" and [r[-1] for r in ddp_rows] == [r[-1] for r in single_rows]
    assert np.allclose(np.array([r[1:-1] for r in ddp_rows[1:]], float), np.array([r[1:-1] for r in single_rows[1:]], float),
                       rtol=0, atol=1e-5)


def copy_data(demo_data, dest, corrupt_train_images=0):
    """A copy of the demo data whose first `corrupt_train_images` training images are not images."""
    shutil.copytree(demo_data / "images", dest / "images")
    for name in ("train_labels.csv", "val_labels.csv"):
        shutil.copy(demo_data / name, dest / name)
    ids = [line.split(",")[0] for line in (dest / "train_labels.csv").read_text().splitlines()]
    bad = [dest / "images" / f"{i}.jpg" for i in ids[:corrupt_train_images]]
    for path in bad:
        path.write_bytes(b"not a jpeg")
    return bad


@pytest.mark.slow
@pytest.mark.subprocess
def test_ddp_resume_from_last_pth_counts_every_ranks_unreadable_images(ddp_run, demo_data, tmp_path):
    ckpt, first = ddp_run
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = tmp_path / "ckpt"
    shutil.copytree(ckpt, resumed)
    # Six training images went bad since: they fall on both ranks' shards, and every one is
    # reported (not only rank 0's).
    bad = copy_data(demo_data, tmp_path / "data", corrupt_train_images=6)
    proc = torchrun(ddp_args(tmp_path / "data", resumed, "--resume", resumed / "last.pth", "--epochs", "3"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from epoch 2" in proc.stdout
    records = read_metrics(resumed)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[:2] == read_metrics(ckpt)
    assert records[2]["skipped_images"] == 6 and "skipped 6 unreadable" in proc.stdout
    assert all(proc.stdout.count(f"skipping unreadable image {path}:") == 1 for path in bad), proc.stdout
    assert load(resumed / "last.pth")["epoch"] == 3
    assert_same_metrics(single_process_val_metrics(resumed / "last.pth", demo_data), records[-1], "val_")


@pytest.mark.slow
@pytest.mark.subprocess
def test_elastic_restart_after_a_worker_is_sigkilled(tmp_path):
    # 210 training images: an epoch lasts seconds, so the kill lands mid-run. One validation
    # image: rank 1's validation shard is empty, which must not hang the job either.
    data = tmp_path / "data"
    make_demo_data.main(["--out", str(data), "--num_images", "300", "--seed", "3"])
    (data / "val1.csv").write_text((data / "val_labels.csv").read_text().splitlines()[0] + "\n")
    ckpt = tmp_path / "ckpt"
    args = ddp_args(data, ckpt, "--val_csv_file", data / "val1.csv", "--epochs", "3", "--resume", "auto")
    # Without it the restarted workers can read the dead ones' addresses from torchrun's
    # shared store and fail to connect (see distributed.restart_store_warning).
    env = dict(job_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([*TORCHRUN, "--max_restarts=1", MAIN, *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + JOB_TIMEOUT_S
        while not (ckpt / "last.pth").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.05)
        os.kill(worker_with_rank(proc.pid, 0), signal.SIGKILL)  # rank 0: the one that writes
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        stop_job(proc)
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, output
    assert "exitcode: -9" in output and "resumed from epoch 1" in output  # torchrun restarted the workers
    assert "warning: torchrun --max_restarts" not in output
    assert [r["epoch"] for r in read_metrics(ckpt)] == [1, 2, 3]
    assert load(ckpt / "last.pth")["epoch"] == 3
    assert load(ckpt / "best.pth")["epoch"] == max(improved_epochs(read_metrics(ckpt)))


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_rank_ends_the_job_with_its_error(demo_data, tmp_path):
    # One corrupt training image under --strict_images: only the rank whose shard holds it
    # fails; the other rank, waiting for it in the gradient all-reduce, must not hang.
    data = tmp_path / "data"
    bad = copy_data(demo_data, data, corrupt_train_images=1)[0]
    start = time.time()
    proc = torchrun(ddp_args(data, tmp_path / "ckpt", "--strict_images"))
    assert proc.returncode != 0
    assert time.time() - start < JOB_TIMEOUT_S
    assert f"unreadable training image {bad}" in proc.stderr and "error (rank " in proc.stderr, proc.stderr
    assert not (tmp_path / "ckpt" / "metrics.jsonl").exists() or read_metrics(tmp_path / "ckpt") == []


HELPERS_SCRIPT = r"""
import sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from dataset import ShardSampler
from engine import distributed
from engine.runtime import Runtime
from engine.score.inference import gather_predictions
from engine.train.epoch import EpochProgress, epoch_train_loss

info, device = distributed.setup("cpu", timeout_s=3)
rt = Runtime(device, dist=info, show_progress=False)
# 7 items on 2 ranks: rank 0 scores 0, 2, 4, 6 and rank 1 scores 1, 3, 5; item 5 is unreadable.
mine = list(ShardSampler(7, info.world_size, info.rank))
ok = [i for i in mine if i != 5]
indices, dists, errors = gather_predictions(rt, ok, np.repeat(np.array(ok, float)[:, None], 10, 1),
                                            [(i, "bad") for i in mine if i == 5])
assert indices == [0, 1, 2, 3, 4, 6] and dists[:, 0].tolist() == indices and errors == [(5, "bad")], indices
# Mean training loss over both ranks' samples: (1 + 2) / (1 + 3).
assert epoch_train_loss(rt, EpochProgress(loss_sum=[1.0, 2.0][info.rank], loss_count=[1, 3][info.rank])) == 0.75
bn = torch.nn.BatchNorm1d(2)
bn.running_mean.fill_(info.rank + 1.0)
distributed.broadcast_buffers(info, bn)
assert bn.running_mean.tolist() == [1.0, 1.0]
print("helpers ok", flush=True)
if info.rank == 1:
    time.sleep(120)  # hangs: never joins the next collective
start = time.time()
try:
    distributed.all_reduce_sum(info, [1.0])
except RuntimeError as exc:
    print(f"timed out after {time.time() - start:.1f} s", flush=True)
    # os._exit: tearing down a process group whose peer hangs can abort the interpreter
    # (gloo: "terminate called without an active exception"); the figure is already out.
    import os
    os._exit(3)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_helpers_across_two_ranks_and_hung_rank_times_out(tmp_path):
    env = dict(job_env(), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs, logs = [], [tmp_path / f"rank{r}.txt" for r in range(2)]
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, "-c", HELPERS_SCRIPT, ROOT], stdout=f, stderr=subprocess.STDOUT,
                                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
        assert procs[0].wait(timeout=90) == 3, logs[0].read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "helpers ok" in logs[1].read_text(), logs[1].read_text()
    seconds = float(logs[0].read_text().split("timed out after ")[1].split()[0])
    assert 2.5 <= seconds < 30  # the 3 s process-group timeout, not the 600 s default


@pytest.mark.subprocess
def test_multi_gpu_prints_a_runnable_torchrun_command(demo_data, tmp_path, monkeypatch, capsys):
    argv = [str(a) for a in tiny_train_args(demo_data, tmp_path / "ckpt")]
    monkeypatch.setattr(sys, "argv", ["main.py", *argv, "--multi_gpu", "True", "--gpu_ids", "2", "3"])
    assert run_main(sys.argv[1:]) == 2
    command = capsys.readouterr().err.splitlines()[-1].strip()
    assert command.startswith("CUDA_VISIBLE_DEVICES=2,3 torchrun --standalone --nproc_per_node=2 main.py "), command
    # What it runs: the same flags without --multi_gpu/--gpu_ids, which parse to the same run.
    rest = shlex.split(command)[5:]
    parser = main_cli.get_args_parser()
    assert rest == argv and parser.parse_args(rest) == parser.parse_args(argv)
    assert not (tmp_path / "ckpt").exists()  # nothing was started
    assert distributed.torchrun_command("main.py", ["--multi_gpu=yes", "--epochs", "1", "--gpu_ids=0"], 1, [0]) == \
        "CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=1 main.py --epochs 1"


def test_restart_store_warning():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in distributed.restart_store_warning(shared)
    assert distributed.restart_store_warning(dict(shared, TORCHELASTIC_USE_AGENT_STORE="False")) == ""
    assert distributed.restart_store_warning(dict(shared, TORCHELASTIC_MAX_RESTARTS="0")) == ""
    assert distributed.restart_store_warning({}) == ""  # a plain run


def test_multi_gpu_false_trains_in_one_process(demo_data, tmp_path):
    args = main_cli.get_args_parser().parse_args(["--multi_gpu", "False"])
    assert args.multi_gpu is False
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1", "--multi_gpu", "False")) == 0
    assert [r["epoch"] for r in read_metrics(ckpt)] == [1]
    assert not torch.distributed.is_initialized()  # a plain run never joins a process group
