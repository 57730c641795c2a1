"""A collection of images as an IterableDataset, shared out across processes (torchrun
ranks) and their DataLoader workers without any listing ahead or any talk between them.

Every (rank, worker) pair is one of R x W slots and walks the same sources, keeping only
its own items: a file by a hash of its path (so the share does not depend on the order a
folder lists in, nor on what else it holds), a tar shard whole by its position in the
list when there are at least as many shards as slots (each shard is then read by one
slot only), else its members by hash. Every item falls to exactly one slot, the same
one in every process, and items already scored (a resumed run) are skipped before they
are read.
"""
import io
import zlib

from torch.utils.data import IterableDataset, get_worker_info

from .sources import iter_entries


def shard_ordinals(sources) -> dict:
    """{source index: its position among the shard sources}."""
    shards = [n for n, s in enumerate(sources) if s.kind == "shard"]
    return {n: k for k, n in enumerate(shards)}


def slot_of(ref: str, source: int, ordinals: dict, slots: int) -> int:
    """The slot (0 .. slots - 1) that scores the item `ref` of source number `source`."""
    if source in ordinals and len(ordinals) >= slots:
        return ordinals[source] % slots
    return zlib.crc32(ref.encode("utf-8", "surrogateescape")) % slots


class CollectionDataset(IterableDataset):
    """Items are dicts: ref (path or SHARD:MEMBER), source (index into `sources`), key (id
    within the source), order (label CSV row, else -1), image, ok, error, warning (as
    ImageDataset's). `decoder`: an ImageDataset whose decode() reads and transforms one
    image. `done`: refs to skip. `rank`, `world_size`: this process among torchrun's."""

    def __init__(self, sources, decoder, rank=0, world_size=1, done=frozenset()):
        self.sources, self.decoder = list(sources), decoder
        self.rank, self.world_size, self.done = rank, world_size, done
        self.ordinals = shard_ordinals(self.sources)

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slots, mine = self.world_size * workers, self.rank * workers + worker
        for n, source in enumerate(self.sources):
            whole_shard = n in self.ordinals and len(self.ordinals) >= slots
            if whole_shard and self.ordinals[n] % slots != mine:
                continue  # another slot reads this shard; this one never opens it

            def wanted(ref, n=n, whole_shard=whole_shard):
                return ref not in self.done and (whole_shard or slot_of(ref, n, self.ordinals, slots) == mine)

            for entry in iter_entries(source, wanted):
                yield self.item(n, entry)

    def item(self, source: int, entry) -> dict:
        if entry.error:
            image, ok, error, warning = self.decoder.blank(), False, entry.error, ""
        else:
            data = io.BytesIO(entry.data) if isinstance(entry.data, bytes) else entry.data
            image, ok, error, warning = self.decoder.decode(data)
        return {"ref": entry.ref, "source": source, "key": entry.key, "order": entry.order, "image": image,
                "ok": ok, "error": error, "warning": warning}


def count_items(sources):
    """How many entries the sources hold, or None when that means reading tar shards
    through (too dear for a progress bar's total). Walks folders and lists a second time:
    for a background thread."""
    if any(s.kind == "shard" for s in sources):
        return None
    return sum(1 for s in sources for _ in iter_entries(s))


def rank_share(refs_with_source, sources, rank, world_size, workers) -> set:
    """The refs among (ref, source index) pairs that fall to `rank` (whose loader has
    `workers` workers, 0 counting as 1): what this process must skip on a resume."""
    workers = max(workers, 1)
    ordinals, slots = shard_ordinals(sources), world_size * workers
    return {ref for ref, source in refs_with_source if slot_of(ref, source, ordinals, slots) // workers == rank}

