"""The NIMA network: a conv base, then dropout + Linear(num_features, 10) + softmax."""
import torch
import torch.nn as nn

from .constants import DEFAULT_BASE_MODEL, DEFAULT_DROPOUT, DEFAULT_HEAD, HEADS, NUM_BINS  # noqa: F401 - NUM_BINS: re-exported
from .registry import get_backbone


class Softmax32(nn.Module):
    """Softmax over the bins, computed in float32 even under autocast."""

    def forward(self, x):
        return torch.softmax(x.float(), dim=1)


class NIMA(nn.Module):
    def __init__(self, features: nn.Module, pool: nn.Module, num_features: int,
                 num_classes: int = NUM_BINS, dropout: float = 0.75, hidden: nn.Sequential = None):
        super().__init__()
        self.features = features
        self.pool = pool
        # Reference head: index 1 is the Linear layer, as in the released checkpoint
        # (classifier.1.*). Paper head (`hidden` = VGG16's fc6, ReLU, Dropout, fc7, ReLU):
        # classifier.0/3/6 (fc6, fc7, the new 10-way layer), torchvision's own indices.
        hidden = list(hidden) if hidden is not None else []
        self.classifier = nn.Sequential(*hidden, nn.Dropout(p=dropout), nn.Linear(num_features, num_classes), Softmax32())

    def forward(self, x):  # (B, 3, H, W) -> (B, num_classes), rows sum to 1
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))  # flatten, not view: works with channels_last

    def param_groups(self, conv_base_lr: float, dense_lr: float) -> list:
        """The reference's two learning rates: one for the pretrained base, one for the new
        10-way layer. Under the paper head, VGG16's fc6/fc7 are pretrained layers of the
        base network, so they take conv_base_lr, as in the paper."""
        new = list(self.classifier[-2].parameters())  # the Linear(num_features, num_classes)
        new_ids = {id(p) for p in new}
        base = list(self.features.parameters()) + [p for p in self.classifier.parameters() if id(p) not in new_ids]
        return [{"params": base, "lr": conv_base_lr, "name": "conv_base"},
                {"params": new, "lr": dense_lr, "name": "dense"}]


def default_model_args(base_model: str = DEFAULT_BASE_MODEL) -> dict:
    spec = get_backbone(base_model)
    return {"base_model": spec.name, "num_classes": NUM_BINS, "dropout": DEFAULT_DROPOUT, "image_size": spec.image_size,
            "resize_size": spec.resize_size, "normalize": spec.normalize, "head": DEFAULT_HEAD}


def check_model_args(model_args: dict) -> None:
    """Raise ValueError, naming the flag, for a head or input size the backbone cannot take."""
    spec = get_backbone(model_args["base_model"])
    head = model_args.get("head", "reference")
    if head not in HEADS:
        raise ValueError(f"--head {head!r}: valid heads are {', '.join(HEADS)}")
    if head == "paper" and spec.build_paper_head is None:
        raise ValueError(f"--head paper exists for vgg16 only (it keeps VGG16's fully connected fc6/fc7 layers); "
                         f"{spec.name} takes --head reference (global pooling + dropout + Linear + softmax)")
    size = model_args["image_size"]
    if spec.fixed_image_size and size != spec.image_size:
        raise ValueError(f"--image_size {size}: {spec.name} takes exactly {spec.image_size} px")
    if size < spec.min_image_size:
        raise ValueError(f"--image_size {size}: {spec.name} needs at least {spec.min_image_size} px")


def build_model(model_args: dict, pretrained: str = "none") -> NIMA:
    """Build NIMA from its construction arguments (what a checkpoint's `model_args` holds).
    Checkpoints older than `head` hold the reference head."""
    check_model_args(model_args)
    spec = get_backbone(model_args["base_model"])
    hidden = None
    if model_args.get("head", "reference") == "paper":
        features, pool, hidden, num_features = spec.build_paper_head(pretrained)
    else:
        features, pool, num_features = spec.build(pretrained)
    return NIMA(features, pool, num_features, num_classes=model_args["num_classes"], dropout=model_args["dropout"],
                hidden=hidden)
