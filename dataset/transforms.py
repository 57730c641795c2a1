"""Image transforms: resize the shorter side, crop, to tensor in [0, 1], maybe normalise.

Training takes a random crop and a random horizontal flip (as the reference);
evaluation takes the centre crop (the reference wrongly used random crops there);
test-time augmentation takes a fixed list of crops so scores stay deterministic.
"""
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

# torchvision's ImageNet statistics: what --normalize imagenet subtracts and divides by.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TTA = 10


def _to_tensor_steps(normalize: str) -> list:
    steps = [T.ToTensor()]
    if normalize == "imagenet":
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    elif normalize != "none":
        raise ValueError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
    return steps


def train_transform(model_args: dict):
    return T.Compose([T.Resize(model_args["resize_size"]), T.RandomCrop(model_args["image_size"]),
                      T.RandomHorizontalFlip(), *_to_tensor_steps(model_args["normalize"])])


def eval_transform(model_args: dict):
    return T.Compose([T.Resize(model_args["resize_size"]), T.CenterCrop(model_args["image_size"]),
                      *_to_tensor_steps(model_args["normalize"])])


class TTACrops:
    """The first `n` of: centre, top-left, top-right, bottom-left, bottom-right crops,
    then the same five flipped horizontally. Returns a (n, 3, H, W) tensor; n = 1 is
    exactly eval_transform."""

    def __init__(self, model_args: dict, n: int):
        if not 1 <= n <= MAX_TTA:
            raise ValueError(f"--tta must be between 1 and {MAX_TTA}, got {n}")
        self.n, self.size = n, model_args["image_size"]
        self.resize = T.Resize(model_args["resize_size"])
        self.to_tensor = T.Compose(_to_tensor_steps(model_args["normalize"]))

    def __call__(self, img):
        img = self.resize(img)
        tl, tr, bl, br, centre = F.five_crop(img, self.size)
        crops = [centre, tl, tr, bl, br]
        crops += [F.hflip(c) for c in crops]
        return torch.stack([self.to_tensor(c) for c in crops[:self.n]])
