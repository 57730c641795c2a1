"""REFERENCE-STYLE loops, kept only to be measured against ours in the same run.

These reproduce how the reference implementation spent its time, written here from its
description (README, "Deliberate differences from the reference"), not from its code: float32 everywhere, an EMD
loss computed with Python loops over the samples and over the bins, a `.item()` after
every training step, a plain DataLoader (no pinned memory, workers restarted every
epoch), and inference one image at a time with the mean and standard deviation summed
in Python. They run OUR network (model.build_model) on the same device, so the gap they
show is what the loss, the step and the data path cost, not a different model.
Nothing outside bench/ uses them.
"""
if not __package__:  # run by path (python bench/reference_loop.py): run as python -m bench.reference_loop
    import _by_path
    _by_path.run_as_module(__file__)


import torch

from dataset import eval_transform, load_rgb
from engine.flags import ArgumentParser


def looped_emd_loss(p: torch.Tensor, q: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """EMD_r of (B, K, 1) distributions the reference's way: for each sample, for each
    prefix length k, Python's built-in sum() over the prefix rows (one tiny tensor op
    per element), then the batch mean, also with sum(). Same value as model.emd_loss."""
    num_bins = p.shape[1]
    per_sample = []
    for b in range(p.shape[0]):
        total = 0.0
        for k in range(1, num_bins + 1):
            total = total + torch.abs(sum(p[b, :k] - q[b, :k])) ** r
        per_sample.append((total / num_bins) ** (1.0 / r))
    return sum(per_sample) / p.shape[0]


def reference_train_steps(model, optimizer, batches, device) -> list:
    """Train over `batches` (dicts with 'image' and 'target') the reference's way;
    returns the per-step losses it synchronised for."""
    model.train()
    losses = []
    for batch in batches:
        images = batch["image"].to(device)
        targets = batch["target"].to(device).float().view(-1, 10, 1)
        outputs = model(images).view(-1, 10, 1)
        optimizer.zero_grad()
        loss = looped_emd_loss(targets, outputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def looped_mean_std(dist: torch.Tensor) -> tuple:
    """Mean and standard deviation of one (10, 1) predicted distribution, summed bin by
    bin in Python as the reference's test script did, then read back to the host."""
    mean = 0.0
    for score, p in enumerate(dist, 1):
        mean = mean + p * score
    var = 0.0
    for score, p in enumerate(dist, 1):
        var = var + p * (score - mean) ** 2
    return float(mean), float(var ** 0.5)


@torch.no_grad()
def reference_predict_tensors(model, images: torch.Tensor) -> list:
    """Batch-1 inference over (N, 3, H, W) tensors already on the device."""
    model.eval()
    return [looped_mean_std(model(images[i:i + 1]).view(10, 1)) for i in range(len(images))]


@torch.no_grad()
def reference_predict_files(model, model_args, paths, device) -> list:
    """The reference's test loop end to end: for each file, decode, transform, move one
    image to the device, predict, sum the mean and std in Python. No DataLoader."""
    model.eval()
    transform = eval_transform(model_args)
    out = []
    for path in paths:
        image = transform(load_rgb(path)).unsqueeze(0).to(device)
        out.append(looped_mean_std(model(image).view(10, 1)))
    return out



class ReferenceNIMA(torch.nn.Module):
    """The reference's network as its model file defined it: a torchvision VGG16's
    features, `.view` to a vector, Dropout + Linear + Softmax (keys features.N.*,
    classifier.1.*: the released checkpoint's)."""

    def __init__(self, base):
        super().__init__()
        self.features = base.features
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(p=0.75), torch.nn.Linear(25088, 10), torch.nn.Softmax(dim=1))

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


def get_args_parser():
    p = ArgumentParser(description="Reference-style per-image scoring (a benchmark baseline).", allow_abbrev=False)
    p.add_argument("--model", required=True, help="released-format VGG16 state_dict")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="pred.txt to write")
    return p


def main(argv=None) -> int:
    """A reference-style scoring process, for bench/cpu_scoring.py to time against test.py:
    build the whole torchvision VGG16 (as the reference did, then keep its features), load
    a released-format state_dict, and score every image of a folder one at a time.

        python -m bench.reference_loop --model epoch-82.pth --images FOLDER --out pred.txt
    """
    import os

    import torchvision
    from PIL import Image
    from torchvision import transforms as T

    args = get_args_parser().parse_args(argv)
    model = ReferenceNIMA(torchvision.models.vgg16())
    model.load_state_dict(torch.load(args.model, map_location="cpu", weights_only=True))
    model.eval()
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    lines = []
    with torch.no_grad():
        for name in sorted(os.listdir(args.images)):
            image = transform(Image.open(os.path.join(args.images, name)).convert("RGB")).unsqueeze(0)
            mean, std = looped_mean_std(model(image).view(10, 1))
            lines.append(f"{os.path.splitext(name)[0]} mean: {mean:.3f} | std: {std:.3f}\n")
    with open(args.out, "w") as f:
        f.writelines(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
