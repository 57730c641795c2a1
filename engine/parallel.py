"""A progress-barred map over many files, in worker processes when asked for."""
import multiprocessing

from tqdm import tqdm


def parallel_map(fn, items, workers: int, desc: str, progress: bool = True, chunks_per_worker: int = 4):
    """[fn(item) for item in items], in completion order (not input order), by `workers`
    processes (in this process when workers <= 1). `fn` must be a top-level function so
    a Pool can pickle it."""
    items = list(items)
    bar = dict(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True, unit="img")
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in tqdm(items, **bar)]
    # Chunks amortise the inter-process traffic; several per worker keep the load balanced.
    chunk = max(1, min(64, len(items) // (workers * chunks_per_worker)))
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap_unordered(fn, items, chunksize=chunk), **bar))
