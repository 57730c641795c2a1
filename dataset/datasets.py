"""Datasets over image files, with or without label distributions.

An image that cannot be read does not raise inside a DataLoader worker (which would
end the whole run): the sample comes back with `ok = False` and the reason, a blank
image in its place, and the caller decides (skip and count, or stop under
--strict_images). Nothing is dropped without being reported.
"""
import torch
from torch.utils.data import Dataset

from .images import ImageReadError, load_rgb
from .labels import NUM_BINS


class ImageDataset(Dataset):
    """Items are dicts: index, image (C, H, W) or (N, C, H, W) under TTA, target (10,),
    ok (bool), error (str, '' when ok)."""

    def __init__(self, paths, transform, dists=None, image_shape=(3, 224, 224)):
        self.paths = list(paths)
        self.dists = None if dists is None else torch.as_tensor(dists, dtype=torch.float32)
        self.transform = transform
        self.image_shape = tuple(image_shape)  # of a blank stand-in for an unreadable image

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        # A training sampler hands (index, seed): the random crop and flip of a sample then
        # depend only on (seed, epoch, index), so a resumed epoch repeats them exactly.
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            torch.manual_seed(seed)
        target = self.dists[index] if self.dists is not None else torch.full((NUM_BINS,), float("nan"))
        try:
            image = self.transform(load_rgb(self.paths[index]))
            ok, error = True, ""
        except ImageReadError as exc:
            image, ok, error = torch.zeros(self.image_shape), False, str(exc)
        return {"index": index, "image": image, "target": target, "ok": ok, "error": error}

    @classmethod
    def from_table(cls, table, transform, image_shape):
        return cls(table.paths, transform, table.dists, image_shape)
