"""Backbones by name: each entry builds the conv base and says how to feed it.

A backbone builder returns (features, pool, num_features): `features` maps an image
batch (B, 3, H, W) to feature maps, `pool` is parameter-free and brings them to a
fixed size, and `num_features` is the length of the flattened pooled output that the
NIMA head's Linear layer takes.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[str], tuple]  # pretrained ('imagenet' | 'none' | path) -> (features, pool, num_features)
    image_size: int
    resize_size: int
    normalize: str  # 'imagenet' | 'none': what new training feeds it
    has_imagenet_weights: bool = True


BACKBONES: dict = {}


def register(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown --base_model {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def list_backbones() -> list:
    return sorted(BACKBONES)


class PretrainedWeightsError(RuntimeError):
    pass


def load_torchvision_weights(model: nn.Module, name: str, pretrained: str) -> None:
    """Fill a torchvision classification model with ImageNet weights, or leave it random."""
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # no network, proxy refusal, bad hash, ...
            raise PretrainedWeightsError(
                f"could not download the ImageNet weights for {name} ({weights.url}): {exc}. "
                f"Offline, train from scratch with --pretrained none, or download that file "
                f"elsewhere and pass it with --pretrained PATH") from exc
    else:
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise PretrainedWeightsError(
                f"--pretrained {pretrained!r}: no such file; use 'imagenet', 'none' or the path "
                f"of a torchvision weights file for {name}") from None
        except Exception as exc:
            raise PretrainedWeightsError(f"--pretrained {pretrained!r}: not a readable weights file: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"--pretrained {pretrained!r} does not fit torchvision's {name}: {exc}") from exc


def _build_vgg16(pretrained: str):
    vgg = torchvision.models.vgg16(weights=None)
    load_torchvision_weights(vgg, "vgg16", pretrained)
    # The adaptive pool is a no-op at 224 (the conv output is already 7x7), so the
    # released checkpoint is unaffected, and it lets any --image_size >= 32 reach the
    # same Linear(25088, 10).
    return vgg.features, nn.AdaptiveAvgPool2d((7, 7)), 512 * 7 * 7


register(Backbone("vgg16", _build_vgg16, image_size=224, resize_size=256, normalize="imagenet"))


def _build_tiny_cnn(pretrained: str):
    if pretrained != "none":
        raise PretrainedWeightsError("tiny_cnn has no pretrained weights; use --pretrained none")

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    features = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 128))
    return features, nn.AdaptiveAvgPool2d(1), 128


# A four-layer CNN trained from scratch: for the demo and the tests on CPU, not for AVA.
register(Backbone("tiny_cnn", _build_tiny_cnn, image_size=64, resize_size=72, normalize="imagenet",
                  has_imagenet_weights=False))
