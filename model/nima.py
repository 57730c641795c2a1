"""The NIMA network: a conv base, then dropout + Linear(num_features, 10) + softmax."""
import torch
import torch.nn as nn

from .registry import get_backbone


class Softmax32(nn.Module):
    """Softmax over the bins, computed in float32 even under autocast."""

    def forward(self, x):
        return torch.softmax(x.float(), dim=1)


class NIMA(nn.Module):
    def __init__(self, features: nn.Module, pool: nn.Module, num_features: int,
                 num_classes: int = 10, dropout: float = 0.75):
        super().__init__()
        self.features = features
        self.pool = pool
        # Index 1 is the Linear layer, as in the released checkpoint (classifier.1.*).
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(num_features, num_classes), Softmax32())

    def forward(self, x):  # (B, 3, H, W) -> (B, num_classes), rows sum to 1
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))  # flatten, not view: works with channels_last

    def param_groups(self, conv_base_lr: float, dense_lr: float) -> list:
        """The reference's two learning rates: one for the conv base, one for the head."""
        return [{"params": self.features.parameters(), "lr": conv_base_lr, "name": "conv_base"},
                {"params": self.classifier.parameters(), "lr": dense_lr, "name": "dense"}]


def default_model_args(base_model: str = "vgg16") -> dict:
    spec = get_backbone(base_model)
    return {"base_model": base_model, "num_classes": 10, "dropout": 0.75, "image_size": spec.image_size,
            "resize_size": spec.resize_size, "normalize": spec.normalize}


def build_model(model_args: dict, pretrained: str = "none") -> NIMA:
    """Build NIMA from its construction arguments (what a checkpoint's `model_args` holds)."""
    spec = get_backbone(model_args["base_model"])
    features, pool, num_features = spec.build(pretrained)
    return NIMA(features, pool, num_features, num_classes=model_args["num_classes"], dropout=model_args["dropout"])
