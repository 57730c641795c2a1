"""Scoring a collection of any size (test.py): stream the images through the model, write
the results to part files as they come (engine/score/parts.py), and merge the parts into the
prediction files at the end (engine/score/merge.py).

Under torchrun every process scores its own share (dataset/stream.py) and writes its
own parts; after a barrier rank 0 merges. A process that dies ends the job (torchrun
stops the others), and the parts written so far stay for `--resume`.
"""
import threading
import time

import torch
from tqdm import tqdm

from dataset import ImageDataset
from dataset.sources import iter_entries
from dataset.stream import CollectionDataset, count_items, rank_share
from fileio import OutputWriteError, check_writable

from engine.distributed import gather_objects
from engine.score.inference import batch_distributions, images_per_batch, inference_transform
from engine.loaders import default_workers, make_loader
from engine.score.parts import PartsResumeError, done_refs, new_token, part_path, parts_dir, prepare, run_record, write_part

PART_SIZE = 5000       # images per part file (--part_size)
FLUSH_SECONDS = 10.0   # a part is also written when its oldest result is this old: a kill loses little


class PartWriter:
    """Buffers one process's results and writes them as numbered part files."""

    def __init__(self, folder, rank, part_size=PART_SIZE, flush_seconds=FLUSH_SECONDS):
        self.folder, self.rank, self.part_size, self.flush_seconds = folder, rank, part_size, flush_seconds
        self.token, self.seq, self.rows, self.since = new_token(), 0, [], None
        self.written = 0

    def add(self, rows) -> None:
        if rows and self.since is None:
            self.since = time.monotonic()
        self.rows.extend(rows)
        if len(self.rows) >= self.part_size or (self.rows and time.monotonic() - self.since >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self.rows:
            write_part(part_path(self.folder, self.rank, self.token, self.seq), self.rows)
            self.seq, self.written, self.rows, self.since = self.seq + 1, self.written + len(self.rows), [], None


class Progress:
    """Rank 0's bar: images/s, and an ETA once the total is known (counted in a
    background thread when it is not given and no tar shard has to be read through)."""

    def __init__(self, rt, sources, total, already_done, world_size):
        self.bar = tqdm(desc="score" if world_size == 1 else f"score (rank 0 of {world_size})", unit="img",
                        disable=not rt.progress, dynamic_ncols=True, leave=False, smoothing=0.1)
        self.counted, self.done_before, self.world_size = [total], already_done, world_size
        if total is None and not self.bar.disable:
            threading.Thread(target=lambda: self.counted.__setitem__(0, count_items(sources)), daemon=True).start()
        self.total_set = False

    def update(self, n) -> None:
        if not self.total_set and self.counted[0] is not None:
            self.bar.total = max(self.counted[0] - self.done_before, 0) // self.world_size or None
            self.total_set = True
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def score_collection(model, model_args, sources, rt, out_dir, *, model_path, batch_size, workers, tta=1,
                     max_pixels=None, resume=False, part_size=PART_SIZE, total=None) -> int:
    """Score every image of `sources` not already in a part (with `resume`) into part
    files under out_dir/parts. Returns how many results this process wrote. Raises
    PartsResumeError or OutputWriteError (on every rank) when the parts folder cannot be
    used, before any image is read."""
    folder = parts_dir(out_dir)
    problem = note = ""
    if rt.dist.is_main:
        try:
            check_writable(out_dir)
            note = prepare(folder, run_record(model_path, model_args, sources, tta, max_pixels), resume)
        except (PartsResumeError, OutputWriteError) as exc:
            problem = f"{type(exc).__name__}:{exc}"
    # Every process waits here for rank 0 to have cleared or checked the parts folder.
    problem = gather_objects(rt.dist, problem)[0]
    if problem:
        kind, _, text = problem.partition(":")
        raise (PartsResumeError if kind == "PartsResumeError" else OutputWriteError)(text)
    if note and rt.dist.is_main:
        print(note)
    done = set()
    if resume:
        done = rank_share(done_refs(folder), sources, rt.dist.rank, rt.dist.world_size, workers)
    already = gather_objects(rt.dist, len(done))
    size = model_args["image_size"]
    decoder = ImageDataset([], inference_transform(model_args, tta, rt.uint8_transfer),
                           image_shape=(3, size, size) if tta == 1 else (tta, 3, size, size), max_pixels=max_pixels)
    dataset = CollectionDataset(sources, decoder, rt.dist.rank, rt.dist.world_size, frozenset(done))
    del done
    loader = make_loader(dataset, images_per_batch(batch_size, tta), workers, rt)
    writer = PartWriter(folder, rt.dist.rank, part_size)
    progress = Progress(rt, sources, total, sum(already), rt.dist.world_size)
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                ok = batch["ok"].tolist()
                dists = batch_distributions(model, batch["image"], rt).double().tolist() if any(ok) else None
                writer.add([(ref, source, key, order, "ok" if good else "error", warn if good else err,
                             dists[n] if good else None)
                            for n, (ref, source, key, order, good, err, warn) in enumerate(zip(
                                batch["ref"], batch["source"].tolist(), batch["key"], batch["order"].tolist(), ok,
                                batch["error"], batch["warning"]))])
                progress.update(len(ok))
        writer.flush()
    finally:
        progress.close()
    return writer.written


def collection_workers(device, sources, flag, batch_size, tta, peek=None) -> int:
    """--workers, or the default for as many items as the sources hold (counted up to
    one batch more than a single batch: a small job needs no worker process)."""
    if flag is not None:
        return flag
    limit = images_per_batch(batch_size, tta) + 1
    n = peek if peek is not None else _count_up_to(sources, limit)
    return default_workers(device, n * tta, batch_size)


def _count_up_to(sources, limit) -> int:
    n = 0
    for source in sources:
        if source.kind == "shard":
            return limit  # reading a shard through to count it is the work itself
        for _ in iter_entries(source):
            n += 1
            if n >= limit:
                return n
    return n

