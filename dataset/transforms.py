"""Image transforms: resize the shorter side, crop, to tensor in [0, 1], maybe normalise.

Training takes a random crop and a random horizontal flip (as the reference);
evaluation takes the centre crop (the reference wrongly used random crops there);
test-time augmentation takes a fixed list of crops so scores stay deterministic.

Each transform has a uint8 variant (`uint8=True`): the same geometry (resize, crop,
flip, with the same random draws), ending in a (3, H, W) uint8 tensor instead of
float [0, 1] (normalised). The loader then moves a quarter of the bytes, and
`uint8_to_input` converts and normalises on the device with the very operations
ToTensor and Normalize apply on the CPU.
"""
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from .constants import IMAGENET_MEAN, IMAGENET_STD, check_tta


def _check_normalize(normalize: str) -> None:
    if normalize not in ("imagenet", "none"):
        raise ValueError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")


def _to_tensor_steps(normalize: str, uint8: bool = False) -> list:
    _check_normalize(normalize)
    if uint8:
        return [T.PILToTensor()]  # uint8 (3, H, W); uint8_to_input finishes the job on the device
    steps = [T.ToTensor()]
    if normalize == "imagenet":
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return steps


class Transform(T.Compose):
    """A Compose that says what dtype it returns, so a dataset's stand-in for an
    unreadable image can match the readable ones in a batch."""

    def __init__(self, steps, uint8: bool):
        super().__init__(steps)
        self.output_dtype = torch.uint8 if uint8 else torch.float32


def train_transform(model_args: dict, uint8: bool = False):
    return Transform([T.Resize(model_args["resize_size"]), T.RandomCrop(model_args["image_size"]),
                      T.RandomHorizontalFlip(), *_to_tensor_steps(model_args["normalize"], uint8)], uint8)


def eval_transform(model_args: dict, uint8: bool = False):
    return Transform([T.Resize(model_args["resize_size"]), T.CenterCrop(model_args["image_size"]),
                      *_to_tensor_steps(model_args["normalize"], uint8)], uint8)


def tta_crops(img, size: int, n: int) -> list:
    """The first `n` TTA crops of an already resized image (PIL or tensor (..., H, W)):
    centre, top-left, top-right, bottom-left, bottom-right, then the same five
    flipped horizontally."""
    tl, tr, bl, br, centre = F.five_crop(img, size)
    crops = [centre, tl, tr, bl, br]
    crops += [F.hflip(c) for c in crops]
    return crops[:n]


class TTACrops:
    """The first `n` of: centre, top-left, top-right, bottom-left, bottom-right crops,
    then the same five flipped horizontally (tta_crops). Returns a (n, 3, H, W) tensor;
    n = 1 is exactly eval_transform."""

    def __init__(self, model_args: dict, n: int, uint8: bool = False):
        check_tta(n)
        self.n, self.size = n, model_args["image_size"]
        self.resize = T.Resize(model_args["resize_size"])
        self.to_tensor = T.Compose(_to_tensor_steps(model_args["normalize"], uint8))
        self.output_dtype = torch.uint8 if uint8 else torch.float32

    def __call__(self, img):
        return torch.stack([self.to_tensor(c) for c in tta_crops(self.resize(img), self.size, self.n)])


_STATS = {}  # (device, normalize) -> (mean, std) tensors, made once: no host-to-device copy per batch


def uint8_to_input(images: torch.Tensor, normalize: str, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (..., 3, H, W), on any device, as the network's float32 input: the
    values ToTensor (+ Normalize for 'imagenet') would give, computed by the same
    operations in the same order (divide by 255, subtract the mean, divide by the
    std), so the two paths agree to the last bit on the CPU. channels_last applies to
    4-D batches, in the same pass as the conversion."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    _check_normalize(normalize)
    fmt = torch.channels_last if channels_last and images.dim() == 4 else torch.preserve_format
    x = images.to(dtype=torch.float32, memory_format=fmt).div_(255)
    if normalize == "imagenet":
        key = (x.device, normalize)
        if key not in _STATS:
            _STATS[key] = tuple(torch.tensor(v, dtype=torch.float32, device=x.device).view(-1, 1, 1)
                                for v in (IMAGENET_MEAN, IMAGENET_STD))
        mean, std = _STATS[key]
        x.sub_(mean).div_(std)
    return x
