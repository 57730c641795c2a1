"""What the heat maps and the enhancement share: the network input as a differentiable
function of [0, 1] pixels, where the model's centre crop lies in the photo, the
predicted mean as a differentiable number, and safe file names for image ids."""
import hashlib
import os
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from dataset.images import is_image_file
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from model.nima import NUM_BINS

_RATINGS = torch.arange(1, NUM_BINS + 1, dtype=torch.float32)


def pixel_crop(rgb, model_args) -> torch.Tensor:
    """The model's centre crop of an RGB PIL image as (1, 3, s, s) pixels in [0, 1]: the
    evaluation transform (resize, centre crop, ToTensor) without the normalisation, which
    to_network_input applies inside the graph so gradients reach the pixels."""
    return eval_transform(dict(model_args, normalize="none"))(rgb).unsqueeze(0)


def to_network_input(x01: torch.Tensor, normalize: str) -> torch.Tensor:
    """[0, 1] pixels (B, 3, H, W) -> what the network takes, as Normalize would make it."""
    if normalize == "none":
        return x01
    mean = torch.tensor(IMAGENET_MEAN, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def predicted_mean(dist: torch.Tensor) -> torch.Tensor:
    """(B, 10) distributions -> (B,) mean ratings sum_i i * p_i, differentiable."""
    return (dist.float() * _RATINGS.to(dist.device)).sum(dim=1)


def crop_geometry(size, model_args) -> tuple:
    """Where the evaluation transform's centre crop lies for an image of `size` (width,
    height): ((resized width, resized height), (left, top) of the crop in the resized
    image). Resize's arithmetic (shorter side to resize_size, the longer truncated) and
    CenterCrop's (rounded offsets; a crop larger than the image is zero-padded, so its
    offset is negative)."""
    w, h = size
    r, s = model_args["resize_size"], model_args["image_size"]
    rw, rh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)

    def offset(length):
        return -((s - length) // 2) if s > length else int(round((length - s) / 2.0))
    return (rw, rh), (offset(rw), offset(rh))


def crop_box(size, model_args) -> tuple:
    """The centre crop as (x0, y0, x1, y1) in the original image's pixels, clipped to it."""
    (rw, rh), (left, top) = crop_geometry(size, model_args)
    s, (w, h) = model_args["image_size"], size
    return (max(0.0, left * w / rw), max(0.0, top * h / rh), min(w, (left + s) * w / rw), min(h, (top + s) * h / rh))


def crop_map_to_image(crop_map: torch.Tensor, size, model_args) -> torch.Tensor:
    """A (s, s) map over the model's crop -> (height, width) over the whole image: pasted
    where the crop lies in the resized image (zero elsewhere: those pixels cannot change
    the score), then resized bilinearly to the image's size."""
    (rw, rh), (left, top) = crop_geometry(size, model_args)
    s = model_args["image_size"]
    canvas = crop_map.new_zeros(rh, rw)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + s, rh), min(left + s, rw)
    canvas[y0:y1, x0:x1] = crop_map[y0 - top:y1 - top, x0 - left:x1 - left]
    return F.interpolate(canvas[None, None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]


def image_to_tensor(rgb) -> torch.Tensor:
    """An RGB PIL image as (1, 3, H, W) float32 pixels in [0, 1]."""
    return TF.to_tensor(rgb).unsqueeze(0)


def tensor_to_image(x01: torch.Tensor):
    """(1, 3, H, W) pixels in [0, 1] -> an RGB PIL image (rounded to 8 bits)."""
    return TF.to_pil_image((x01[0].detach().clamp(0, 1).cpu() * 255).round().to(torch.uint8))


@contextmanager
def deterministic(device):
    """Deterministic kernels while gradients are taken, restored afterwards: on CUDA the
    backward passes of convolutions and adaptive pooling otherwise add in varying order,
    and a heat map would differ in its last bits between two runs. Nothing to do on CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 120


def safe_name(image_id: str, taken: set = None) -> str:
    """A file name without extension for an image id (which may hold '/', spaces, '..'):
    an image extension is dropped, so the caller's own is the only one (`photo.png` ->
    `photo`, written as photo.png, not photo.png.png); unsafe runs of characters become
    '_', a leading dot is escaped, long ids are cut. When the name is already in `taken`
    (two ids that clean to the same name, as a.jpg and a.png), a short hash of the id
    tells them apart. The name is added to `taken`."""
    stem = str(image_id)
    if is_image_file(stem):
        stem = os.path.splitext(stem)[0]
    name = _UNSAFE.sub("_", stem).strip("_") or "image"
    if name.startswith("."):
        name = "_" + name
    digest = hashlib.sha1(str(image_id).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    if len(name) > MAX_NAME_CHARS:
        name = name[:MAX_NAME_CHARS - 9] + "-" + digest
    if taken is not None:
        if name in taken:
            name = f"{name}-{digest}"
        taken.add(name)
    return name
