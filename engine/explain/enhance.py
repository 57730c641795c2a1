"""The paper's application: find the global photo enhancement that raises the predicted
mean score, by gradient ascent through the model.

Each parameter is a differentiable operation on [0, 1] RGB pixels, applied in this
order and clipped to [0, 1] after each, with bounds that keep a photo natural:

| parameter  | operation                                               | neutral | bounds      |
| brightness | x * v                                                   | 1       | [0.6, 1.5]  |
| contrast   | g + v (x - g), g = the whole photo's mean luminance     | 1       | [0.6, 1.5]  |
| saturation | L + v (x - L), L = the pixel's luminance (Rec. 601)     | 1       | [0.5, 1.6]  |
| gamma      | x ** v (v < 1 brightens the mid-tones)                  | 1       | [0.6, 1.6]  |
| sharpness  | x + v (x - blur(x)), blur: Gaussian of one model pixel  | 0       | [-0.5, 1.5] |

Bounded reparametrisation: v = neutral + tanh(u) * (upper - neutral) for u >= 0 and
neutral + tanh(u) * (neutral - lower) below, so every u is a valid setting and u = 0 is
the neutral one, where the ascent starts (Adam on u).

Resize and crop: the model scores the centre crop of the photo resized to its
resize_size. The parameters are optimised on that crop, as [0, 1] pixels before the
input normalisation (applied inside the graph), so the model is differentiable end to
end; then the same operations are applied to the full-resolution photo. The operations
are per pixel except two, which are made resolution-independent: contrast pivots on
the mean luminance of the whole photo (not of the crop), and sharpness's blur is one
pixel of the model's input, i.e. resize_size / shorter side of the photo at full size.
The scores reported are the model's on the written images, through the usual resize
and centre crop, not the optimiser's own.
"""
import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from dataset.images import load_rgb
from dataset.transforms import eval_transform

from engine.explain.params import PARAMS
from engine.explain.pixels import deterministic, image_to_tensor, pixel_crop, predicted_mean, tensor_to_image, to_network_input

MIN_GAIN = 1e-3  # a rise in the predicted mean smaller than this is no rise
_LUMA = (0.299, 0.587, 0.114)


def luminance(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # an image smaller than the kernel: reflect what it has, zero beyond
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        x = F.pad(x, (radius - pad,) * 4, mode="replicate")
    else:
        x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k, groups=3)  # separable: rows, then columns
    return F.conv2d(x, k.transpose(2, 3), groups=3)


def blur(x: torch.Tensor, model_pixel: float) -> torch.Tensor:
    """Gaussian blur of sigma = one model pixel, `model_pixel` of this image's pixels. For a
    large photo (model_pixel > 2), the blur is done at the model's scale and resized
    back, which is what the detail layer means there and far cheaper."""
    if model_pixel <= 2:
        return _gaussian_blur(x, max(model_pixel, 0.5))
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h / model_pixel)), max(1, round(w / model_pixel))), mode="area")
    return F.interpolate(_gaussian_blur(small, 1.0), size=(h, w), mode="bilinear", align_corners=False)


def apply_params(x: torch.Tensor, values: dict, grey: float, model_pixel: float = 1.0) -> torch.Tensor:
    """The enhancement of (B, 3, H, W) pixels in [0, 1]; values: name -> float or 0-d tensor."""
    for name in PARAMS:
        if name not in values:
            continue
        v = values[name]
        if name == "brightness":
            x = x * v
        elif name == "contrast":
            x = grey + v * (x - grey)
        elif name == "saturation":
            lum = luminance(x)
            x = lum + v * (x - lum)
        elif name == "gamma":
            x = x.clamp_min(1e-4) ** v  # x ** v has an infinite slope at 0 for v < 1
        else:
            x = x + v * (x - blur(x, model_pixel))
        x = x.clamp(0.0, 1.0)
    return x


def bounded(name: str, t):
    """t in [-1, 1] (tanh(u), or a sweep position) -> the parameter's value in its bounds."""
    lo, neutral, hi = PARAMS[name]
    if isinstance(t, torch.Tensor):
        return neutral + torch.where(t >= 0, t * (hi - neutral), t * (neutral - lo))
    return neutral + (t * (hi - neutral) if t >= 0 else t * (neutral - lo))


def photo_grey(rgb) -> float:
    """Mean luminance of the whole photo in [0, 1]: the contrast operation's pivot."""
    return float(luminance(image_to_tensor(rgb)).mean())


def model_pixel_size(rgb, model_args) -> float:
    """How many of the photo's pixels one pixel of the model's input spans."""
    return min(rgb.size) / model_args["resize_size"]


@torch.no_grad()
def score_image(model, model_args, rgb, device) -> float:
    """The predicted mean of an RGB PIL image as test.py scores it (resize, centre crop)."""
    x = eval_transform(model_args)(rgb).unsqueeze(0).to(device)
    return float(predicted_mean(model(x))[0])


def enhance(model, model_args, rgb, names, steps: int, lr: float, device) -> dict:
    """Gradient ascent of the predicted mean over `names` (see the module). Returns
    {'values': best settings found (neutral ones when the score cannot be raised),
    'history': predicted mean at each step on the model's crop (steps + 1 values, the
    first at the neutral setting), 'best_step', 'raised': bool}."""
    model.eval()
    x01 = pixel_crop(rgb, model_args).to(device)
    grey = photo_grey(rgb)
    u = torch.zeros(len(names), device=device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    history, best_step, best_values = [], 0, {n: PARAMS[n][1] for n in names}
    with torch.enable_grad(), deterministic(device):
        for step in range(steps + 1):
            t = torch.tanh(u)
            values = {n: bounded(n, t[i]) for i, n in enumerate(names)}
            y = apply_params(x01, values, grey, model_pixel=1.0)
            mean = predicted_mean(model(to_network_input(y, model_args["normalize"])))[0]
            history.append(float(mean.detach()))
            if history[-1] > history[best_step] or step == 0:
                best_step, best_values = step, {n: float(v.detach()) for n, v in values.items()}
            if step == steps:
                break
            # autograd.grad, not backward(): only u's gradient is needed, none for the weights
            (grad,) = torch.autograd.grad(-mean, u)
            u.grad = grad
            opt.step()
    raised = history[best_step] - history[0] >= MIN_GAIN
    if not raised:
        best_step, best_values = 0, {n: PARAMS[n][1] for n in names}
    return {"values": best_values, "history": history, "best_step": best_step, "raised": raised}


def jpeg_bytes(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def enhance_photo(model, model_args, rgb, names, steps: int, lr: float, device, quality: int = 95) -> dict:
    """The whole application for one photo, as tools.enhance and the service's /enhance
    give it: the ascent (enhance), the settings applied at full size, written as a JPEG
    of `quality`, and both predicted means, the after one of that JPEG decoded again
    (what a person downloads). When the settings found do not raise the JPEG's score
    (the crop's gain did not survive full resolution and compression), or nothing could
    be raised, the photo is given back unchanged and `note` says why. Returns {'jpeg':
    bytes, 'before', 'after', 'raised', 'note', 'values' (the settings applied: neutral
    ones when unchanged), 'found' (enhance's own result)}."""
    found = enhance(model, model_args, rgb, names, steps, lr, device)
    before = score_image(model, model_args, rgb, device)
    result = apply_full(rgb, found["values"], model_args, device) if found["raised"] else rgb
    data = jpeg_bytes(result, quality)
    after = score_image(model, model_args, load_rgb(io.BytesIO(data)), device)
    note = ""
    if not found["raised"]:
        note = "the predicted mean cannot be raised within the bounds: the photo is left unchanged"
    elif after <= before:
        note = (f"the settings found raised the crop's score, but not the full photo's ({before:.3f} -> {after:.3f}): "
                f"the photo is left unchanged")
        data = jpeg_bytes(rgb, quality)
        after = score_image(model, model_args, load_rgb(io.BytesIO(data)), device)
    raised = not note
    return {"jpeg": data, "before": before, "after": after, "raised": raised, "note": note,
            "values": found["values"] if raised else {n: PARAMS[n][1] for n in names}, "found": found}


@torch.no_grad()
def apply_full(rgb, values: dict, model_args, device="cpu"):
    """The settings applied to the full-resolution photo -> an RGB PIL image of its size."""
    x = image_to_tensor(rgb).to(device)
    return tensor_to_image(apply_params(x, values, photo_grey(rgb), model_pixel_size(rgb, model_args)))


def sweep_positions(steps: int) -> list:
    """Positions in [-1, 1] of a sweep: from the lower bound through neutral (the middle,
    for an odd count) to the upper bound, evenly spaced on each side."""
    return [float(t) for t in np.linspace(-1.0, 1.0, steps)] if steps > 1 else [0.0]


def sweep(model, model_args, rgb, name: str, steps: int, device) -> tuple:
    """([values], [PIL images at full size], [predicted means]) of `name` swept over its
    bounds with the other parameters neutral."""
    values = [bounded(name, t) for t in sweep_positions(steps)]
    images = [apply_full(rgb, {name: v}, model_args, device) for v in values]
    return values, images, [score_image(model, model_args, im, device) for im in images]
