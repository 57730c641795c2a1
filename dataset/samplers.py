"""Samplers that make every epoch's order a function of (seed, epoch), so a run can
resume in the middle of an epoch without repeating or skipping a sample, and that
split work across distributed ranks."""
import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler):
    """Training order: a permutation seeded by (seed, epoch), dealt to `num_replicas`
    ranks, each index paired with a per-(seed, epoch, index) augmentation seed. Each rank gets the same number of samples (the few left over at the end of
    the permutation wait for the next epoch's order), and `start` skips the samples
    this rank already trained on in this epoch."""

    def __init__(self, num_items: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.num_items, self.seed, self.num_replicas, self.rank = num_items, seed, num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return self.num_items // self.num_replicas

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g)
        mine = order[self.rank::self.num_replicas][:self.per_rank()][self.start:].tolist()
        # Each index travels with its own augmentation seed (see ImageDataset).
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter([(i, (base + i) % 2**62) for i in mine])

    def __len__(self):
        return max(self.per_rank() - self.start, 0)


class ShardSampler(Sampler):
    """Evaluation order: rank r takes items r, r + R, r + 2R, ... Every item is seen
    exactly once across ranks, with no padding duplicates."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, num_items, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
