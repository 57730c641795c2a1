"""test.py on collections in separate processes: two torchrun processes (gloo on the
loopback) give the output of one; a process killed with SIGKILL ends its job, and the
run resumed with another number of processes gives the output of an uninterrupted run
with no image scored twice; on 20,000 files the first results are written while scoring goes on and the
peak memory is that of 2,000. Every subprocess has a timeout: a hang fails the test."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_mixed, read_rows, row_numbers, run_test, stop_job, tiny_checkpoint, worker_with_rank

TEST = os.path.join(ROOT, "test.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
JOB_TIMEOUT_S = 180  # a job takes 5-15 s on 2 busy cores


def job_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed set (a folder + 3 shards with corrupt members) and its 1-process output."""
    root = tmp_path_factory.mktemp("mixed_dist")
    folder, shards = make_mixed(root)
    ckpt = tiny_checkpoint(root / "tiny.pth")
    data = {"root": root, "ckpt": ckpt, "specs": [str(folder), str(shards / "{000000..000002}.tar")]}
    data["single"] = root / "single"
    assert run_test(flags(data, data["single"], "--workers", "0")) == 1
    return data


def flags(mixed, out, *extra):
    # --device cpu: gloo even where a GPU exists (two ranks cannot share one GPU under NCCL).
    return [str(a) for a in ["--model", mixed["ckpt"], "--test_images", *mixed["specs"], "--predictions", out, "--quiet",
                             "--device", "cpu", "--batch_size", "8", "--dist_timeout", "60", *extra]]


def torchrun(args):
    return subprocess.run([*TORCHRUN, TEST, *args], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def assert_same_output(got, expected):
    a, b = read_rows(got), read_rows(expected)
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]  # same images, same order
    assert np.allclose(row_numbers(a), row_numbers(b), rtol=0, atol=1e-5)
    assert read_rows(got, "errors.csv") == read_rows(expected, "errors.csv")
    assert (got / "pred.txt").read_text().splitlines()[0].split()[0] == (expected / "pred.txt").read_text().split()[0]


def part_refs(out):
    refs = []
    for part in sorted((out / "parts").glob("part-*.csv")):
        with open(part, newline="") as f:
            refs += [r["ref"] for r in csv.DictReader(f)]
    return refs


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_give_the_one_process_output(mixed, tmp_path):
    out = tmp_path / "two"
    # A loader worker per process: 4 slots for 3 shards, so the members are dealt by hash.
    proc = torchrun(flags(mixed, out, "--workers", "1", "--keep_parts"))
    assert proc.returncode != 0 and "exitcode  : 1" in proc.stderr, proc.stdout + proc.stderr  # corrupt files: exit 1
    assert proc.stdout.count("scored ") == 1, proc.stdout  # only rank 0 merges and reports
    assert_same_output(out, mixed["single"])
    ids = [r["image_id"] for r in read_rows(out)]
    assert "000000/dup" in ids and "000001/dup" in ids and len(ids) == len(set(ids)) == 40 + 62
    parts = {p.name.split("-")[1] for p in (out / "parts").glob("part-*.csv")}
    assert parts == {"r00000", "r00001"}  # each process wrote its own parts
    refs = part_refs(out)
    assert len(refs) == len(set(refs)) == len(ids) + len(read_rows(out, "errors.csv"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_killed_process_ends_the_job_and_resume_with_another_count_completes_it(mixed, tmp_path):
    out = tmp_path / "killed"
    # Two processes, no loader worker (2 slots for 3 shards: whole shards), one image per
    # batch, a part every 3 images; rank 1 is killed once two parts are on disk.
    args = flags(mixed, out, "--workers", "0", "--batch_size", "1", "--part_size", "3")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([*TORCHRUN, TEST, *args], cwd=ROOT, env=job_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + JOB_TIMEOUT_S
        while len(list((out / "parts").glob("part-*.csv"))) < 2:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.005)
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=JOB_TIMEOUT_S)  # torchrun stops rank 0 too: no hang
        ended_after = time.time() - killed_at
    finally:
        stop_job(proc)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode != 0 and "exitcode  : -9" in log, log
    assert ended_after < 60, ended_after
    assert not (out / "predictions.csv").exists(), "the run ended before the kill: nothing was interrupted\n" + log
    before = part_refs(out)
    killed_parts = {p.name for p in (out / "parts").glob("part-*.csv")}
    assert 6 <= len(before) < 102 + 5
    # Resumed by one process (this one), with a loader worker.
    assert run_test(flags(mixed, out, "--workers", "1", "--resume", "--keep_parts")) == 1
    assert_same_output(out, mixed["single"])
    assert killed_parts <= {p.name for p in (out / "parts").glob("part-*.csv")}  # kept, not rescored
    refs = part_refs(out)
    assert len(refs) == len(set(refs)), "an image was scored twice"
    assert set(before) < set(refs) and len(refs) == len(read_rows(out)) + len(read_rows(out, "errors.csv"))


def tiny_folder(root, n):
    """n tiny JPEGs (16x12), 1,000 per subfolder."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        folder = root / f"{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"{i:06d}.jpg").write_bytes(blobs[i % 8])
    return root


def timed_run(args, out):
    """Run test.py; returns (exit code, seconds to the first part file or None, seconds in
    all, peak resident memory in MB of the process and its loader workers)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, TEST, *args], cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage: the largest of the process tree
            if pid:
                break
            if first is None and any((out / "parts").glob("part-*.csv")):
                first = time.time() - start
            assert time.time() - start < JOB_TIMEOUT_S, "test.py did not finish"
            time.sleep(0.02)
    finally:
        if proc.returncode is None and not pid:
            proc.kill()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, first, time.time() - start, usage.ru_maxrss / 1024


@pytest.mark.subprocess
@pytest.mark.slow
def test_streaming_first_results_early_and_memory_flat(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    figures = {}
    for n in (2000, 20000):
        out = tmp_path / f"out{n}"
        args = ["--model", ckpt, "--test_images", tiny_folder(tmp_path / f"img{n}", n), "--predictions", out,
                "--quiet", "--device", "cpu", "--batch_size", "64", "--keep_parts"]
        code, first, total, peak = timed_run([str(a) for a in args], out)
        assert code == 0
        assert len(read_rows(out)) == n
        figures[n] = {"first_part_s": first, "total_s": round(total, 2), "peak_mb": round(peak, 1),
                      "parts": len(list((out / "parts").glob("part-*.csv")))}
    print("streaming:", json.dumps(figures))
    big = figures[20000]
    # Results were on disk while scoring went on (5,000 per part: 4 parts), and early.
    assert big["parts"] == 4 and big["first_part_s"] is not None and big["first_part_s"] < big["total_s"] - 1
    assert big["first_part_s"] < 60
    # Nothing is held per image while scoring; the merge of 20,000 rows is a few MB. A
    # loaded machine moves the peak by a few MB either way: 48 MB is far below what
    # holding the decoded images would take (20,000 x 12 KB crops = 240 MB).
    assert big["peak_mb"] - figures[2000]["peak_mb"] < 48, figures
