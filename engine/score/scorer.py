"""Scoring photos from Python (a notebook, a script): load a checkpoint once, then score
PIL images or image files.

    from engine.score.scorer import Scorer
    scorer = Scorer.from_checkpoint("ckpts/best.pth")        # or the released VGG16 file
    s = scorer.score("photo.jpg")                            # Score(mean=5.41, std=1.52, distribution=[...], percentile=...)
    scores = scorer.score(["a.jpg", "b.png", Image.open("c.webp")])

The numbers are the ones test.py writes: the same checkpoint loader, the same decoding
(every mode to RGB, EXIF orientation applied), the same centre crop or fixed TTA crops,
the same batched forward pass.
"""
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

from dataset.images import ImageReadError, check_max_pixels, load_rgb, upright_rgb
from dataset.constants import MAX_TTA
from model import load_for_inference
from model.card import percentiles, read_card

from engine.distributed import pick_device
from engine.explain.heatmaps import explain_image
from engine.score.inference import images_per_batch, inference_transform, predict
from engine.loaders import default_batch_size
from engine.metrics import mean_and_std
from engine.runtime import Runtime, resolve_speed_flags


@dataclass
class Score:
    mean: float          # sum_i i * p_i over ratings 1..10
    std: float           # sqrt(sum_i p_i (i - mean)^2)
    distribution: list   # 10 probabilities p_1..p_10, summing to 1
    # 0..100: the share of the model's validation (or calibration) images it scored lower
    # (model/card.py); None when the checkpoint's card has no percentiles.
    percentile: Optional[float] = None


class Scorer:
    def __init__(self, model, model_args: dict, rt: Runtime, tta: int = 1, batch_size: int = None, card: dict = None):
        """batch_size: network inputs per forward pass (crops under TTA), as test.py's, and
        with its default (8 on a CPU, where VGG16's memory grows with the batch; 64 on CUDA).
        card: the checkpoint's model card (model/card.py); its percentiles fill in
        Score.percentile."""
        batch_size = default_batch_size(rt.device) if batch_size is None else batch_size
        if not 1 <= tta <= MAX_TTA:
            raise ValueError(f"tta must be between 1 and {MAX_TTA}, got {tta}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.model_args, self.rt = model, model_args, rt
        self.tta, self.batch_size = tta, batch_size
        self.transform = inference_transform(model_args, tta)
        self.max_image_pixels = None  # None: Pillow's limit
        self.card = card
        self.quantiles = ((card or {}).get("percentiles") or {}).get("quantiles")

    @classmethod
    def from_checkpoint(cls, path, device="auto", tta: int = 1, batch_size: int = None, amp="auto",
                        max_image_pixels=None, normalize=None, channels_last="auto", exact_decode=False) -> "Scorer":
        """Either checkpoint format (ours or the reference's released state_dict).
        device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'; amp, channels_last,
        exact_decode, max_image_pixels and normalize as test.py's flags of those names
        (max_image_pixels None: Pillow's limit; normalize, for a bare state_dict: which
        release it is). The defaults are test.py's: on a CPU with native bf16, VGG16 scores
        in bf16, and large JPEGs are decoded reduced (docs/performance.md)."""
        device = pick_device(device)
        model, model_args = load_for_inference(path, device, normalize=normalize)
        use_amp, use_cl = resolve_speed_flags(amp, channels_last, device, model_args["base_model"])
        if use_cl:
            model = model.to(memory_format=torch.channels_last)
        rt = Runtime(device, use_amp, use_cl, show_progress=False, jpeg_draft=not exact_decode).for_model(model_args)
        scorer = cls(model, model_args, rt, tta, batch_size, card=read_card(path, normalize))
        scorer.max_image_pixels = check_max_pixels(max_image_pixels)
        return scorer

    @property
    def draft_side(self):
        """The shorter side a JPEG may be decoded down to (dataset.images.draft), or None
        for full-size decoding (exact_decode)."""
        return self.model_args["resize_size"] if self.rt.jpeg_draft else None

    def score(self, images):
        """One input (a PIL image, or a path) -> a Score; a list or tuple of them -> a list
        of Scores in the same order. A file that cannot be read raises
        dataset.ImageReadError naming it."""
        if isinstance(images, (list, tuple)):
            return self._score_many(list(images))
        return self._score_many([images])[0]

    def preprocess(self, rgb: Image.Image) -> torch.Tensor:
        """An upright RGB image, as dataset.images.load_rgb returns it, -> the network input:
        (3, H, W), or (tta, 3, H, W) under TTA. self.transform is stateless and picklable:
        the scoring service sends it to its decoding processes."""
        return self.transform(rgb)

    def score_tensors(self, inputs) -> list:
        """preprocess() outputs (a list, or already stacked) -> their Scores in order, in one
        forward pass: the caller bounds the batch (the service's --max_batch)."""
        images = inputs if isinstance(inputs, torch.Tensor) else torch.stack(list(inputs))
        n = len(images)
        batch = {"index": torch.arange(n), "image": images, "ok": torch.ones(n, dtype=torch.bool), "error": [""] * n}
        return self._scores([batch])

    def _batches(self, images: list):
        """Batches shaped like the DataLoader's that predict() takes, decoded one batch at
        a time so that a long list never sits in memory as tensors."""
        step = images_per_batch(self.batch_size, self.tta)
        for start in range(0, len(images), step):
            chunk = [self._input(item) for item in images[start:start + step]]
            yield {"index": torch.arange(start, start + len(chunk)), "image": torch.stack(chunk),
                   "ok": torch.ones(len(chunk), dtype=torch.bool), "error": [""] * len(chunk)}

    def _score_many(self, images: list) -> list:
        return self._scores(self._batches(images))

    def _scores(self, batches) -> list:
        _, dists, _ = predict(self.model, batches, self.rt, desc="score")
        means, stds = mean_and_std(dists)
        return [Score(float(m), float(s), [float(p) for p in d], pct)
                for m, s, d, pct in zip(means, stds, dists, self._percentiles(means))]

    def _percentiles(self, means) -> list:
        if not self.quantiles or len(means) == 0:
            return [None] * len(means)
        return [float(p) for p in percentiles(means, self.quantiles)]

    def _input(self, item) -> torch.Tensor:
        """One item -> its network input; any failure, decoding or transforming (a 0 x 0
        image), is an ImageReadError naming the item, as in test.py's loader."""
        rgb = self._rgb(item)
        try:
            return self.preprocess(rgb)
        except Exception as exc:  # noqa: BLE001 - whatever the transform raises, the item is unusable
            name = item if isinstance(item, (str, os.PathLike)) else f"{type(item).__name__} {getattr(item, 'size', '')}"
            raise ImageReadError(f"{name}: cannot be transformed: {type(exc).__name__}: {exc}") from None

    def _rgb(self, item) -> Image.Image:
        if isinstance(item, Image.Image):
            with warnings.catch_warnings():  # decoder chatter: the image is used all the same, as for files
                warnings.simplefilter("ignore")
                return upright_rgb(item)
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"score() takes PIL images or paths (or a list of them), got {type(item).__name__}")
        try:
            return load_rgb(item, self.max_image_pixels, draft_side=self.draft_side)
        except ImageReadError as exc:
            raise ImageReadError(f"{item}: {exc}") from None

    def explain(self, image) -> tuple:
        """(heat map, Score) of one image (a PIL image or a path): a float32 (height, width)
        array at the image's size in [-1, 1], > 0 where the photo raises the predicted mean
        and < 0 where it lowers it (Grad-CAM, or gradient x input for transformers: see
        engine/explain/heatmaps.py), and the Score of the centre crop it explains (tta=1's)."""
        heat, dist, _ = explain_image(self.model, self.model_args, self._rgb(image), self.rt.device)
        means, stds = mean_and_std(dist[None])
        return heat, Score(float(means[0]), float(stds[0]), [float(p) for p in dist], self._percentiles(means)[0])
