"""Running a model over images: the evaluation transforms, one batch's distributions,
predict() over a loader and the validation metrics (every image once, across ranks).
Scoring files into prediction files is engine/score/collection.py's."""
import numpy as np
import torch
from tqdm import tqdm

from dataset import ImageDataset, TTACrops, eval_transform
from model.nima import NUM_BINS

from engine.distributed import gather_objects
from engine.metrics import compute_metrics, mean_and_std


class BadImageError(RuntimeError):
    """An image that stops a run: unreadable under --strict_images, or a validation set
    with no readable image."""


def inference_transform(model_args, tta=1, uint8=False):
    """PIL RGB image -> (3, H, W) centre crop, or (tta, 3, H, W) fixed crops under TTA;
    uint8 crops with uint8=True (Runtime.images_to_device converts them)."""
    return eval_transform(model_args, uint8=uint8) if tta == 1 else TTACrops(model_args, tta, uint8=uint8)


def inference_dataset(paths, model_args, dists=None, tta=1, max_pixels=None, uint8=False, draft=False):
    transform = inference_transform(model_args, tta, uint8)
    size = model_args["image_size"]
    shape = (3, size, size) if tta == 1 else (tta, 3, size, size)
    return ImageDataset(paths, transform, dists, image_shape=shape, max_pixels=max_pixels, draft=draft)


def images_per_batch(batch_size, tta=1):
    """--batch_size counts network inputs: under TTA each image is `tta` crops, and 64
    images x 10 crops in one VGG16 forward pass need over 20 GB on CPU (measured: the
    process was killed for memory)."""
    return max(1, batch_size // tta)


@torch.no_grad()
def predict(model, loader, rt, desc="predict"):
    """Run the model over a loader of an ImageDataset; returns (indices, dists (N, 10)
    float64, errors) for this rank's items. Under TTA the images are (B, N, C, H, W) and
    the N predicted distributions of each image are averaged."""
    model.eval()
    indices, dists, errors = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not rt.progress, dynamic_ncols=True, leave=False):
        out = batch_distributions(model, batch["image"], rt)
        for i, ok, err, row in zip(batch["index"].tolist(), batch["ok"].tolist(), batch["error"], out):
            if ok:
                indices.append(i)
                dists.append(row.double().numpy())
            else:
                errors.append((i, err))
    return indices, (np.stack(dists) if dists else np.zeros((0, NUM_BINS))), errors


def batch_distributions(model, images, rt) -> torch.Tensor:
    """The model's (B, 10) float32 distributions on the CPU for a loader batch of images,
    (B, C, H, W) or (B, N, C, H, W) under TTA (the N crops' distributions averaged).
    Call under torch.no_grad() with the model in eval mode."""
    crops = images.shape[1] if images.dim() == 5 else 1
    with rt.autocast():
        out = model(rt.images_to_device(images.flatten(0, 1) if crops > 1 else images))
    return out.float().view(len(images), crops, -1).mean(dim=1).cpu()


def gather_predictions(rt, indices, dists, errors):
    """All ranks' predictions, each item once, ordered by dataset index."""
    parts = gather_objects(rt.dist, (indices, dists, errors))
    indices = [i for p in parts for i in p[0]]
    dists = np.concatenate([p[1] for p in parts]) if indices else np.zeros((0, NUM_BINS))
    errors = sorted(e for p in parts for e in p[2])
    order = np.argsort(indices, kind="stable")
    return [indices[k] for k in order], dists[order], errors


def evaluate(model, loader, rt, targets, desc="val", means=None):
    """Metrics over the exact evaluation set (every readable image once, across ranks).

    targets: (N, 10) true distributions indexed like the dataset. A list passed as
    `means` receives the predicted mean of every image scored (the model card's
    percentiles are computed from them)."""
    indices, dists, errors = gather_predictions(rt, *predict(model, loader, rt, desc=desc))
    if not indices:
        raise BadImageError(f"{desc}: no readable image to evaluate ({len(errors)} unreadable)")
    metrics = compute_metrics(dists, np.asarray(targets)[indices])
    if means is not None:
        means.extend(float(m) for m in mean_and_std(dists)[0])
    return metrics, errors
