"""The one batch-scoring pipeline (test.py, with or without --gpu_decode, and main.py
--test): stream the images of a collection of any size through the model, write the
results to part files as they come (engine/score/parts.py), and merge the parts into the
prediction files at the end (engine/score/merge.py). score_to_files does all three.

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

from engine.distributed import barrier, gather_objects
from engine.loaders import default_workers, make_loader
from engine.score.inference import batch_distributions, images_per_batch, inference_transform
from engine.score.merge import merge_and_report
from engine.score.parts import (PART_SIZE, PartsResumeError, done_refs, new_token, part_path, parts_dir, prepare, remove_parts,
                                run_record, write_part)

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
        # Whole parts of exactly part_size results (a batch may straddle two): what a kill can lose.
        while len(self.rows) >= self.part_size:
            rest, self.rows = self.rows[self.part_size:], self.rows[:self.part_size]
            self.flush()
            self.rows, self.since = rest, (time.monotonic() if rest else None)
        if self.rows and time.monotonic() - self.since >= self.flush_seconds:
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


def score_to_files(model, model_args, sources, rt, out_dir, *, model_path, batch_size, workers, table=None, tta=1,
                   max_pixels=None, resume=False, part_size=PART_SIZE, score_range=None, output_format="csv",
                   contact_sheet=0, title=None, keep_parts=False, card=None):
    """Score every image of `sources` into the prediction files of out_dir: every
    process scores its share into parts (score_collection); once all have, rank 0 merges
    them, draws the pictures and prints the report (merge_and_report), then removes the
    parts unless `keep_parts`. `table`: the LabelTable of a table source (its labels give
    the metrics, its rows the order); `card`: the model card (write_predictions'). Returns
    (ids, Openers, errors) on rank 0, None on the other ranks. Raises PartsResumeError or
    OutputWriteError as score_collection."""
    score_collection(model, model_args, sources, rt, out_dir, model_path=model_path, batch_size=batch_size,
                     workers=workers, tta=tta, max_pixels=max_pixels, resume=resume, part_size=part_size,
                     total=len(table) if table is not None else None)
    barrier(rt.dist)  # every process's parts are written
    if not rt.dist.is_main:
        return None  # rank 0 merges and reports every rank's errors
    result = merge_and_report(parts_dir(out_dir), sources, out_dir, model_args, table=table, score_range=score_range,
                              output_format=output_format, contact_sheet=contact_sheet, max_pixels=max_pixels,
                              title=title, card=card)
    if not keep_parts:
        remove_parts(parts_dir(out_dir))
    return result


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
            note = prepare(folder, run_record(model_path, model_args, sources, tta, max_pixels, rt), resume)
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
    loader = collection_loader(sources, model_args, rt, batch_size, workers, tta, max_pixels, frozenset(done))
    del done
    writer = PartWriter(folder, rt.dist.rank, part_size)
    progress = Progress(rt, sources, total, sum(already), rt.dist.world_size)
    try:
        for rows in scored_rows(model, loader, rt):
            writer.add(rows)
            progress.update(len(rows))
        writer.flush()
    finally:
        progress.close()
    return writer.written


def scored_rows(model, loader, rt):
    """For each batch of a collection_loader, its results as part-file rows: (ref, source,
    key, order, 'ok' or 'error', warning or reason, distribution as 10 floats or None)."""
    model.eval()
    for batch in loader:
        ok = batch["ok"].tolist()
        with torch.no_grad():  # not around the yield: the caller's code runs with grad mode as it set it
            dists = batch_distributions(model, batch["image"], rt).double().tolist() if any(ok) else None
        yield [(ref, source, key, order, "ok" if good else "error", warn if good else err, dists[n] if good else None)
               for n, (ref, source, key, order, good, err, warn) in enumerate(zip(
                   batch["ref"], batch["source"].tolist(), batch["key"], batch["order"].tolist(), ok,
                   batch["error"], batch["warning"]))]


def collection_loader(sources, model_args, rt, batch_size, workers, tta=1, max_pixels=None, done=frozenset()):
    """The batches of a collection (this process's share, less the refs in `done`) as
    the model takes them: Pillow decodes in the loader workers, or with rt.gpu_decode the
    workers read the bytes and the device decodes the JPEGs (engine/score/gpu_decode.py).
    Items: ref, source, key, order, image, ok, error, warning (dataset/stream.py)."""
    size = model_args["image_size"]
    shape = (3, size, size) if tta == 1 else (tta, 3, size, size)
    # The device decoder makes uint8 crops; so must the Pillow path beside it.
    pillow = ImageDataset([], inference_transform(model_args, tta, rt.uint8_transfer or rt.gpu_decode),
                          image_shape=shape, max_pixels=max_pixels, draft=rt.jpeg_draft)
    batch = images_per_batch(batch_size, tta)
    if rt.gpu_decode:
        from engine.score.gpu_decode import device_decode_loader  # torchvision.io: only when asked for
        return device_decode_loader(sources, pillow, model_args, rt, batch, workers, tta, done)
    return make_loader(CollectionDataset(sources, pillow, rt.dist.rank, rt.dist.world_size, done), batch, workers, rt)


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

