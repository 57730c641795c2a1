"""Where a predicted score comes from: a signed heat map over the photo of the regions
that raise (> 0) and lower (< 0) the predicted mean rating.

Two gradient methods, both of the predicted mean sum_i i * p_i (not of one bin):

- CNN backbones (vgg16, tiny_cnn, ResNet, MobileNet, EfficientNet, ConvNeXt, ...):
  Grad-CAM on the last convolutional feature map, i.e. the last activation inside the
  conv base shaped (1, C, h, w) with more than one cell that no pooling layer made
  (found with forward hooks, so every backbone of the registry works without a hook of
  its own). Each channel is
  weighted by its spatially averaged gradient and the channels are summed. Unlike the
  original method's ReLU the sign is kept, so the map shows what lowers the score too.
- Transformer backbones (vit_*, swin_*, maxvit_*): their token grids are not
  channel-first feature maps, so gradient x input on the pixels instead: the gradient
  of the mean times the network input (for ImageNet normalisation: the pixel's
  deviation from the ImageNet mean colour), summed over colours and smoothed over
  about a patch (image_size / 14 px). To first order, it is how much the score would
  move if the pixel became that mean colour.

The map is computed over the model's centre crop (the crop test.py scores), then placed
where that crop lies in the photo and resized to the photo's size; pixels outside the
crop get 0 (they cannot change the score). It is divided by its largest magnitude, so
it lies in [-1, 1]. float32 gradients (no autocast), deterministic on CPU and CUDA. Under
bf16 autocast the maps of a VGG16 agreed with these (correlation 0.99994 or more on the
real photographs, largest difference 0.011) but took no less time on a CPU with native
bf16 (the backward pass), so the maps stay float32 whatever --amp says
(docs/performance.md).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.explain.pixels import crop_map_to_image, deterministic, pixel_crop, predicted_mean, to_network_input

TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")
METHODS = ("auto", "grad-cam", "gradient-x-input")


def default_method(model_args) -> str:
    return "gradient-x-input" if str(model_args["base_model"]).startswith(TRANSFORMER_PREFIXES) else "grad-cam"


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.LPPool2d)


def _forward_with_maps(model, x):
    """model(x), and the last (name, activation) inside model.features that is a
    channel-first map of more than one cell and not a pooling layer's output (VGG16's
    last conv map is 14 x 14 at 224 px, its pooled one 7 x 7), or None when there is none."""
    last, pooled = [None], {}
    features = getattr(model, "features", model)

    def hook_for(name):
        def hook(module, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[2] * output.shape[3] < 2:
                return
            if isinstance(module, _POOLS):
                # A container that ends in this pool returns the same tensor. Kept referenced,
                # so that its id cannot be reused by a later tensor during this pass.
                pooled[id(output)] = output
            elif id(output) not in pooled:
                last[0] = ("features." + name if name else "features", output)
        return hook
    handles = [m.register_forward_hook(hook_for(n)) for n, m in features.named_modules()]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, last[0]


def _normalised(m: torch.Tensor) -> torch.Tensor:
    top = m.abs().max()
    return m / top if top > 0 else torch.zeros_like(m)


def crop_heat_map(model, model_args, x01: torch.Tensor, method="auto") -> tuple:
    """(signed map (s, s) over the crop in [-1, 1], predicted distribution (10,) as float64
    numpy, info {'method', 'layer'}) for pixels x01 (1, 3, s, s) in [0, 1] on the model's
    device. `method`: 'auto' (by backbone, see the module), 'grad-cam' or
    'gradient-x-input'; Grad-CAM falls back to gradient x input when the conv base has
    no map of more than one cell (VGG16 at 32 px ends at 1 x 1)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    method = default_method(model_args) if method == "auto" else method
    model.eval()
    size = x01.shape[-2:]
    with torch.enable_grad(), deterministic(x01.device):
        x = to_network_input(x01.detach().float(), model_args["normalize"]).requires_grad_(True)
        dist, found = _forward_with_maps(model, x)
        mean = predicted_mean(dist)[0]
        if method == "grad-cam" and found is not None:
            layer, act = found
            grad = torch.autograd.grad(mean, act)[0]
            cam = (grad.float().mean(dim=(2, 3), keepdim=True) * act.float()).sum(dim=1, keepdim=True)
            crop = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
            info = {"method": "grad-cam", "layer": f"{layer} ({act.shape[2]}x{act.shape[3]})"}
        else:
            grad = torch.autograd.grad(mean, x)[0]
            saliency = (grad * x).sum(dim=1, keepdim=True).detach()
            k = max(1, size[0] // 14) | 1  # odd: a centred window of about one ViT patch
            for _ in range(2):  # two box passes: a smooth bump, no blocky edges
                saliency = F.avg_pool2d(saliency, k, stride=1, padding=k // 2, count_include_pad=False)
            crop = saliency[0, 0]
            info = {"method": "gradient-x-input", "layer": "input pixels"}
    return _normalised(crop.detach()).cpu(), dist.detach()[0].double().cpu().numpy(), info


def explain_image(model, model_args, rgb, device=None, method="auto") -> tuple:
    """(heat map float32 (height, width) at the image's size in [-1, 1], predicted
    distribution (10,) of the centre crop, info) for an upright RGB PIL image."""
    device = device or next(model.parameters()).device
    x01 = pixel_crop(rgb, model_args).to(device)
    crop, dist, info = crop_heat_map(model, model_args, x01, method)
    heat = crop_map_to_image(crop, rgb.size, model_args)
    return heat.numpy().astype(np.float32), dist, info
