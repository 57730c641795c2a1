"""Backbones by name: each entry builds the conv base and says how to feed it.

A backbone builder returns (features, pool, num_features): `features` maps an image
batch (B, 3, H, W) to feature maps, `pool` is parameter-free and brings them to a
fixed size, and `num_features` is the length of the flattened pooled output that the
NIMA head's Linear layer takes.

Registered by hand: `vgg16` (the reference's layout, `features.N.*`), `tiny_cnn`
(tests and demo) and the curated torchvision backbones below. Any other torchvision
classification model is accepted by name too (resolved in get_backbone): the generic
builder runs torchvision's own model up to its pooled feature vector, with the
ImageNet classifier stripped (see strip_classifier), so its keys are torchvision's
own under `features.`.
"""
import difflib
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torchvision

from .constants import CURATED_TORCHVISION


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[str], tuple]  # pretrained ('imagenet' | 'none' | path) -> (features, pool, num_features)
    image_size: int
    resize_size: int
    normalize: str  # 'imagenet' | 'none': what new training feeds it
    min_image_size: int = 32
    fixed_image_size: bool = False  # ViT/MaxViT: the position embeddings / window grid fix the input size
    # pretrained -> (features, pool, hidden layers, their output width): the paper's head
    # (`--head paper`) keeps these pretrained fully connected layers before the 10-way one.
    build_paper_head: Optional[Callable[[str], tuple]] = None


BACKBONES: dict = {}


def register(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


def torchvision_names() -> list:
    return torchvision.models.list_models(module=torchvision.models)


def get_backbone(name: str) -> Backbone:
    if name in BACKBONES:
        return BACKBONES[name]
    others = [n for n in torchvision_names() if n not in BACKBONES]
    if name in others:
        return torchvision_backbone(name)
    raise ValueError(f"unknown --base_model {name!r}" + did_you_mean(str(name), list(BACKBONES) + others)
                     + f"; the curated backbones are {', '.join(sorted(BACKBONES))}, and any other of torchvision's "
                     f"{len(others)} classification models works by its name (torchvision.models.list_models())")


def did_you_mean(name: str, names: list, n: int = 3) -> str:
    """' (did you mean a, b or c?)' for the few names closest to `name` (case aside), or ''."""
    by_lower = {k.lower(): k for k in names}
    close = [by_lower[k] for k in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)]
    if not close:
        return ""
    return " (did you mean " + (close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]) + "?)"


def list_backbones() -> list:
    """The curated names (any other torchvision classification model works too)."""
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


def _build_vgg16_paper_head(pretrained: str):
    vgg = torchvision.models.vgg16(weights=None)
    load_torchvision_weights(vgg, "vgg16", pretrained)
    # fc6, ReLU, Dropout(0.5), fc7, ReLU: torchvision's classifier[0:5], so the ImageNet
    # weights keep their keys (classifier.0.*, classifier.3.*) in the NIMA model.
    return vgg.features, nn.AdaptiveAvgPool2d((7, 7)), vgg.classifier[:5], 4096


register(Backbone("vgg16", _build_vgg16, image_size=224, resize_size=256, normalize="imagenet",
                  build_paper_head=_build_vgg16_paper_head))


def _build_tiny_cnn(pretrained: str):
    if pretrained != "none":
        raise PretrainedWeightsError("tiny_cnn has no pretrained weights; use --pretrained none")

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    features = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 128))
    return features, nn.AdaptiveAvgPool2d(1), 128


# A four-layer CNN trained from scratch: for the demo and the tests on CPU, not for AVA.
register(Backbone("tiny_cnn", _build_tiny_cnn, image_size=64, resize_size=72, normalize="imagenet"))


# --- torchvision backbones with the generic head -------------------------------------

def _arch_kwargs(name: str, weights) -> dict:
    """Constructor arguments that make the architecture match its ImageNet weights, used
    with every --pretrained value so a checkpoint's layout never depends on it."""
    if name in ("googlenet", "inception_v3"):
        # transform_input: Google's weights expect inputs in [-1, 1]; this parameter-free
        # step maps ImageNet-normalised inputs there. The aux classifiers exist only so
        # that the weights load; strip_classifier removes them.
        return {"transform_input": True, "aux_logits": True, "init_weights": False}
    if name.startswith("vit_"):
        return {"image_size": weights.meta["min_size"][0]}
    if name.startswith("maxvit_"):
        return {"input_size": weights.meta["min_size"]}
    return {}


def _in_width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def strip_classifier(model: nn.Module) -> int:
    """Remove a torchvision classifier's ImageNet-specific parts in place, so that
    `model(x)` returns its pooled feature vector (B, width); return the width.

    Removed: the final 1000-way layer, every dropout of the head (NIMA brings its own,
    --dropout) and the auxiliary classifiers. Kept: the global pooling, and whatever
    pretrained layers the head holds before its final layer (ConvNeXt's LayerNorm,
    MaxViT's pre-logits, MobileNetV3's Linear(960, 1280) + Hardswish: that network moved
    its last 1x1 feature layer behind the pooling to save time, so the 1280-wide vector
    is its feature and, pretrained on ImageNet, worth keeping). VGG and AlexNet are the
    exception: their whole classifier is fully connected layers, dropped entirely as in
    the reference's vgg16 head.
    """
    for aux in ("AuxLogits", "aux1", "aux2"):  # inception_v3, googlenet
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
            model.aux_logits = False  # forward then returns a plain tensor
    if isinstance(getattr(model, "dropout", None), nn.Dropout):  # googlenet, inception_v3
        model.dropout = nn.Identity()
    attr = next((a for a in ("fc", "classifier", "heads", "head") if isinstance(getattr(model, a, None), nn.Module)), None)
    if attr is None:
        raise ValueError(f"{type(model).__name__}: no classifier (fc, classifier, heads or head) to replace")
    head = getattr(model, attr)
    layers = list(head.named_children()) if isinstance(head, nn.Sequential) else [("", head)]
    weighted = [i for i, (_, m) in enumerate(layers) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not weighted:
        raise ValueError(f"{type(model).__name__}.{attr}: no final Linear or Conv2d layer to replace")
    if isinstance(model, (torchvision.models.VGG, torchvision.models.AlexNet)):
        setattr(model, attr, nn.Identity())
        return _in_width(layers[weighted[0]][1])
    last = weighted[-1]
    kept = [(n, m) for i, (n, m) in enumerate(layers) if i != last and not isinstance(m, nn.Dropout)]
    setattr(model, attr, nn.Sequential(OrderedDict(kept)) if kept else nn.Identity())
    return _in_width(layers[last][1])


def _build_torchvision(name: str, pretrained: str):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None, **_arch_kwargs(name, weights))
    load_torchvision_weights(model, name, pretrained)  # before stripping: the file has the classifier
    num_features = strip_classifier(model)
    # The whole stripped model is the conv base (its pooling included), so every
    # backbone parameter sits under `features` and gets --conv_base_lr.
    return model, nn.Identity(), num_features


def torchvision_backbone(name: str) -> Backbone:
    """A Backbone for torchvision's classification model `name`, with the input sizes of
    its default ImageNet weights (their transforms' crop and resize sizes)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    preset = weights.transforms()
    min_size = weights.meta.get("min_size", (1, 1))[0]
    return Backbone(name, partial(_build_torchvision, name), image_size=preset.crop_size[0],
                    resize_size=preset.resize_size[0], normalize="imagenet", min_image_size=max(32, min_size),
                    fixed_image_size=name.startswith(("vit_", "maxvit_")))


for _name in CURATED_TORCHVISION:
    register(torchvision_backbone(_name))
