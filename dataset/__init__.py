"""Labels, image decoding, transforms and sources. Names are imported on first use
(PEP 562), so that the torch-free modules (dataset.images, dataset.constants) can be
imported without torch."""
import importlib

_HOMES = {"ImageDataset": "datasets",
          "IMAGE_EXTENSIONS": "images", "ImageReadError": "images", "find_images": "images", "load_rgb": "images",
          "LabelFileError": "label_text", "LabelTable": "labels", "read_label_csv": "labels",
          "EpochShuffleSampler": "samplers", "ShardSampler": "samplers",
          "TTACrops": "transforms", "eval_transform": "transforms", "train_transform": "transforms"}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
