"""Rank and loader-worker counts with sizes that do not divide evenly.

In-process first: the training sampler gives every rank the same number of samples and
steps (a rank with one step more would wait forever in DDP's all-reduce), disjoint; the
evaluation sampler covers every item once; the streaming scorer's (rank, worker) slots
take every item exactly once, and a resume skips exactly what the parts hold, for 1-3
processes x 0-3 workers. Then real torchrun jobs (gloo, 2 processes x 2 loader workers,
odd sizes, bounded by timeouts): test.py resumed after lost parts scores each missing
image once and gives the one-process output; training on 43 images finishes."""
import csv
import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataset.stream as stream
from conftest import ROOT, jpeg, read_rows, row_numbers, run_test, tiny_checkpoint, tiny_train_args, write_tar
from dataset import EpochShuffleSampler, ImageDataset, ShardSampler
from dataset.sources import iter_entries, resolve_specs
from dataset.stream import CollectionDataset, rank_share
from tools import make_demo_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
JOB_TIMEOUT_S = 240  # a job takes 10-40 s on 2 busy cores; a hang fails at this bound


def job_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# ---- training and evaluation samplers -------------------------------------------------

@pytest.mark.parametrize("n,ranks", [(n, r) for n in (0, 1, 2, 3, 5, 7, 8, 13) for r in (1, 2, 3, 4)])
def test_training_sampler_equal_shares(n, ranks):
    per_rank = n // ranks  # by hand: the n % ranks left over wait for another epoch's order
    shares = []
    for rank in range(ranks):
        sampler = EpochShuffleSampler(n, seed=3, num_replicas=ranks, rank=rank)
        sampler.set_epoch(2)
        share = [i for i, _ in sampler]
        assert len(share) == len(sampler) == per_rank, (rank, share)
        shares.append(share)
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == len(flat) == per_rank * ranks and set(flat) <= set(range(n))
    for batch in (1, 2, 3, max(per_rank, 1), per_rank + 1):
        steps = {len(DataLoader(range(len(s)), batch_size=batch)) for s in shares}
        assert steps == {-(-per_rank // batch)}, batch  # the same number of steps on every rank


@pytest.mark.parametrize("ranks", [2, 3])
def test_training_sampler_start_skips_what_was_trained(ranks):
    n = 11
    for rank in range(ranks):
        full = EpochShuffleSampler(n, 0, ranks, rank)
        full.set_epoch(4)
        order = list(full)
        per_rank = n // ranks
        for start in (0, 1, per_rank - 1, per_rank, per_rank + 1):
            s = EpochShuffleSampler(n, 0, ranks, rank)
            s.set_epoch(4, start=start)
            assert list(s) == order[start:] and len(s) == max(per_rank - start, 0), start


def test_left_over_samples_are_trained_in_other_epochs():
    """7 items on 2 ranks: one is left out of each epoch, a different one as the order changes."""
    seen = set()
    for epoch in range(1, 21):
        for rank in range(2):
            s = EpochShuffleSampler(7, 0, 2, rank)
            s.set_epoch(epoch)
            seen |= {i for i, _ in s}
    assert seen == set(range(7))


@pytest.mark.parametrize("n,ranks", [(n, r) for n in (0, 1, 2, 5, 7, 13) for r in (1, 2, 3, 4)])
def test_evaluation_sampler_covers_every_item_once(n, ranks):
    shares = [list(ShardSampler(n, ranks, rank)) for rank in range(ranks)]
    flat = sorted(i for s in shares for i in s)
    assert flat == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ---- the streaming scorer's slots -------------------------------------------------------

@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """13 files in a folder, 2 of them in a subfolder and one unreadable; and 3 tar
    shards of 5, 6 and 7 image members (one unreadable), each beside a .json member."""
    root = tmp_path_factory.mktemp("slots")
    rng = np.random.default_rng(0)
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for n in range(13):
        path = folder / ("sub" if n < 2 else "") / f"f{n:02d}.jpg"
        path.write_bytes(jpeg(rng, 16, 12) if n != 7 else b"not an image")
    shards = root / "shards"
    shards.mkdir()
    for k, count in enumerate((5, 6, 7)):
        members = []
        for n in range(count):
            members += [(f"s{k}_{n}.jpg", jpeg(rng, 16, 12) if (k, n) != (2, 3) else b"garbage"),
                        (f"s{k}_{n}.json", b"{}")]
        write_tar(shards / f"{k:06d}.tar", members)
    return {"root": root, "specs": [str(folder), str(shards / "{000000..000002}.tar")]}


def all_refs(sources):
    return sorted(e.ref for s in sources for e in iter_entries(s))


def slot_items(sources, rank, ranks, workers, worker, done, monkeypatch):
    """What (rank, worker) yields: the DataLoader worker it runs in, simulated."""
    info = SimpleNamespace(num_workers=workers, id=worker) if workers else None
    monkeypatch.setattr(stream, "get_worker_info", lambda: info)
    decoder = ImageDataset([], lambda img: torch.zeros(1), image_shape=(1,))
    return [item["ref"] for item in CollectionDataset(sources, decoder, rank, ranks, frozenset(done))]


@pytest.mark.parametrize("ranks,workers", list(itertools.product((1, 2, 3), (0, 1, 2, 3))))
def test_every_item_falls_to_exactly_one_slot(collection, monkeypatch, ranks, workers):
    """Slots = ranks x workers from 1 to 9: fewer or more than the 3 shards (whole shards,
    or members by hash)."""
    sources = resolve_specs(collection["specs"])
    refs = all_refs(sources)
    assert len(refs) == 13 + 18
    got = [ref for rank in range(ranks) for worker in range(max(workers, 1))
           for ref in slot_items(sources, rank, ranks, workers, worker, (), monkeypatch)]
    assert sorted(got) == refs  # each once: none missing, none twice


@pytest.mark.parametrize("ranks,workers", [(1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 3)])
def test_resume_skips_exactly_what_the_parts_hold(collection, monkeypatch, ranks, workers):
    """Parts from an earlier run (any layout) hold every other item; each rank's share of
    them (rank_share) is what its slots skip: the rest is scored once. 3 slots for 3
    shards is the edge where whole shards are dealt."""
    sources = resolve_specs(collection["specs"])
    refs = all_refs(sources)
    index = {e.ref: n for n, s in enumerate(sources) for e in iter_entries(s)}
    held = refs[::2]
    got = []
    for rank in range(ranks):
        done = rank_share(((r, index[r]) for r in held), sources, rank, ranks, workers)
        for worker in range(max(workers, 1)):
            got += slot_items(sources, rank, ranks, workers, worker, done, monkeypatch)
    assert sorted(got) == sorted(set(refs) - set(held))


def test_real_loader_workers_share_the_items(collection):
    """The same with a real DataLoader of 2 worker processes in each of 2 ranks (4 slots, 3 shards: members by hash)."""
    sources = resolve_specs(collection["specs"])
    decoder = ImageDataset([], lambda img: torch.zeros(1), image_shape=(1,))
    got = []
    for rank in range(2):
        dataset = CollectionDataset(sources, decoder, rank, 2)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, timeout=120)
        got += [ref for batch in loader for ref in batch["ref"]]
    assert sorted(got) == all_refs(sources)


# ---- real torchrun jobs ----------------------------------------------------------------

def part_refs(out):
    refs = {}
    for part in sorted((out / "parts").glob("part-*.csv")):
        with open(part, newline="") as f:
            refs[part.name] = [r["ref"] for r in csv.DictReader(f)]
    return refs


@pytest.mark.slow
@pytest.mark.subprocess
def test_streaming_resume_with_2_processes_and_2_workers(collection, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    common = ["--model", ckpt, "--test_images", *collection["specs"], "--quiet", "--device", "cpu",
              "--batch_size", "3", "--part_size", "4", "--dist_timeout", "60"]
    single = tmp_path / "single"
    assert run_test([*common, "--predictions", single, "--workers", "0"]) == 1  # 2 unreadable images: exit 1
    out = tmp_path / "two"

    def job(*extra):
        return subprocess.run([*TORCHRUN, os.path.join(ROOT, "test.py"), *map(str, common), "--predictions", str(out),
                               "--workers", "2", "--keep_parts", *extra],
                              cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    proc = job()
    # Rank 0 exits 1 for the two unreadable images (torchrun reports it), after merging all.
    assert "exitcode  : 1" in proc.stderr and "scored 29 of 31 images" in proc.stdout, proc.stdout + proc.stderr
    first = part_refs(out)
    flat = [r for refs in first.values() for r in refs]
    assert len(flat) == len(set(flat)) == 31
    # Lose every third part, as a kill would have before they were written; resume.
    lost = sorted(first)[::3]
    for name in lost:
        (out / "parts" / name).unlink()
    proc = job("--resume")
    # Rank 0 exits 1 for the two unreadable images (torchrun reports it), after merging all.
    assert "exitcode  : 1" in proc.stderr and "scored 29 of 31 images" in proc.stdout, proc.stdout + proc.stderr
    second = part_refs(out)
    new = [r for name, refs in second.items() if name not in first for r in refs]
    assert sorted(new) == sorted(r for name in lost for r in first[name])  # the lost ones, each once
    a, b = read_rows(out), read_rows(single)
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    assert np.allclose(row_numbers(a), row_numbers(b), rtol=0, atol=1e-5)
    assert read_rows(out, "errors.csv") == read_rows(single, "errors.csv")


@pytest.mark.slow
@pytest.mark.subprocess
def test_training_with_2_processes_and_2_workers_on_an_odd_size(tmp_path):
    """43 training images (21 per rank, one left over), batches of 8 (8, 8, 5), 9
    validation images over 2 ranks (5 and 4), loader workers: no rank waits for another."""
    data = tmp_path / "data"
    make_demo_data.main(["--out", str(data), "--num_images", "61", "--seed", "1"])
    with open(data / "train_labels.csv") as f:
        assert sum(1 for _ in f) == 43
    ckpt = tmp_path / "ckpt"
    args = [str(a) for a in tiny_train_args(data, ckpt, "--device", "cpu", "--dist_timeout", "60")]
    args[args.index("--num_workers") + 1] = "2"
    proc = subprocess.run([*TORCHRUN, os.path.join(ROOT, "main.py"), *args], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_n"] == 9 for r in records)  # every validation image once, across the ranks
