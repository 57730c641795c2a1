"""Datasets over image files, with or without label distributions.

An image that cannot be read does not raise inside a DataLoader worker (which would
end the whole run): the sample comes back with `ok = False` and the reason, a blank
image in its place, and the caller decides (skip and count, or stop under
--strict_images). Nothing is dropped without being reported. Any exception while
decoding or transforming one image counts as unreadable, not only ImageReadError.
Decoder warnings are caught per image and travel with the sample (`warning`).
"""
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from .decode_limits import decode_limits
from .images import ImageReadError, check_max_pixels, check_resizable, read_rgb
from .labels import NUM_BINS


def resize_target(transform):
    """The shorter side a transform resizes to (a torchvision Resize(int) step, as in
    dataset.transforms), or None when it has none."""
    steps = list(getattr(transform, "transforms", ())) + [getattr(transform, "resize", None)]
    for step in steps:
        if isinstance(step, T.Resize):
            size = step.size
            if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
                return size if isinstance(size, int) else size[0]
    return None


class ImageDataset(Dataset):
    """Items are dicts: index, image (C, H, W) or (N, C, H, W) under TTA, target (10,),
    ok (bool), error (str, '' when ok), warning (decoder warnings, '' when none).

    max_pixels: --max_image_pixels (None: Pillow's default limit). draft: decode a large
    JPEG reduced for the transform's resize size (dataset.images.draft; the CLIs'
    default, off under --exact_decode). The decode limits (deadline, memory, scans) are
    this process's when the dataset is made: they travel with it to loader workers,
    however those are started."""

    def __init__(self, paths, transform, dists=None, image_shape=(3, 224, 224), max_pixels=None, draft=False):
        self.paths = list(paths)
        self.dists = None if dists is None else torch.as_tensor(dists, dtype=torch.float32)
        self.transform = transform
        self.image_shape = tuple(image_shape)  # of a blank stand-in for an unreadable image
        self.blank_dtype = getattr(transform, "output_dtype", torch.float32)
        self.max_pixels = check_max_pixels(max_pixels)
        self.resize_to = resize_target(transform)
        self.draft_side = self.resize_to if draft else None
        self.limits = decode_limits()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        # A training sampler hands (index, seed): the random crop and flip of a sample then
        # depend only on (seed, epoch, index), so a resumed epoch repeats them exactly.
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            torch.manual_seed(seed)
        target = self.dists[index] if self.dists is not None else torch.full((NUM_BINS,), float("nan"))
        image, ok, error, warning = self.decode(self.paths[index])
        return {"index": index, "image": image, "target": target, "ok": ok, "error": error, "warning": warning}

    def decode(self, source) -> tuple:
        """(image tensor, ok, error, warning) of one image: `source` is a path or a binary
        file object (a tar member's bytes). Never raises for a bad image: it comes back
        blank with ok False and the reason."""
        try:
            rgb, warning = read_rgb(source, self.max_pixels, self.limits, self.draft_side)
            if self.resize_to:  # before the resize allocates it
                check_resizable(rgb.size, self.resize_to, self.max_pixels)
            return self.transform(rgb), True, "", warning
        except ImageReadError as exc:
            return self.blank(), False, str(exc), ""
        except Exception as exc:  # noqa: BLE001 - the transforms on an odd image: one unreadable sample, not a dead worker
            return self.blank(), False, f"cannot transform: {type(exc).__name__}: {exc}"[:200], ""

    def blank(self) -> torch.Tensor:
        """The stand-in for an unreadable image: zeros of the readable ones' shape and dtype."""
        return torch.zeros(self.image_shape, dtype=self.blank_dtype)

    @classmethod
    def from_table(cls, table, transform, image_shape, max_pixels=None, draft=False):
        return cls(table.paths, transform, table.dists, image_shape, max_pixels, draft)
