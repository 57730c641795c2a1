"""torch.hub entry point: a ready NIMA model, from a checkpoint or fresh.

    import torch
    from PIL import Image
    model = torch.hub.load("/path/to/this/repo", "nima", source="local", checkpoint="best.pth")  # offline
    x = model.preprocess(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)  # (1, 3, H, W)
    dist = model(x)  # (1, 10): probabilities of the ratings 1..10
    score = (dist * torch.arange(1, 11)).sum(dim=1)
"""
dependencies = ["torch", "torchvision"]


def nima(checkpoint=None, base_model="vgg16", pretrained=False, device="cpu", normalize=None, **kwargs):
    """NIMA in eval mode on `device`, with two plain attributes: `model_args` (its
    construction arguments) and `preprocess` (PIL image -> the (3, H, W) tensor it takes:
    resize, centre crop, [0, 1], normalisation as it was trained).

    checkpoint: a checkpoint file, ours or the reference's released VGG16 state_dict; the
        architecture comes from the file, so `pretrained` and model arguments are refused.
    normalize: with a bare state_dict (the reference's release format), 'none' (its
        2018-2020 release, assumed when not given) or 'imagenet' (its June 2021 release);
        our checkpoints record their own (a contradicting value is an error). Without a
        checkpoint, the input normalisation of the new model.
    base_model: without a checkpoint, any name `main.py --base_model` takes.
    pretrained: without a checkpoint, False (random weights), True or 'imagenet'
        (torchvision's ImageNet weights for the backbone; downloads), or the path of a
        local torchvision weights file.
    kwargs: without a checkpoint, model arguments to override: dropout, image_size,
        resize_size, normalize, head ('reference' or 'paper', vgg16 only).
    """
    from dataset.transforms import eval_transform
    from model import build_model, default_model_args, load_for_inference

    if checkpoint is not None:
        if pretrained or kwargs:
            given = ["pretrained"] * bool(pretrained) + sorted(kwargs)
            raise ValueError(f"nima(checkpoint=...) takes its architecture and weights from the file; "
                             f"drop {', '.join(given)}")
        model, model_args = load_for_inference(checkpoint, device, normalize=normalize)
    else:
        model_args = default_model_args(base_model)  # raises with the valid names
        unknown = sorted(set(kwargs) - (set(model_args) - {"base_model"}))
        if unknown:
            raise ValueError(f"nima(): unknown argument{'s' if len(unknown) != 1 else ''} {', '.join(unknown)}; model arguments are "
                             f"{', '.join(sorted(set(model_args) - {'base_model'}))}")
        model_args.update(kwargs, **({"normalize": normalize} if normalize else {}))
        weights = "imagenet" if pretrained is True else ("none" if pretrained is False else str(pretrained))
        model = build_model(model_args, pretrained=weights).to(device).eval()
    model.model_args = model_args
    model.preprocess = eval_transform(model_args)
    return model
