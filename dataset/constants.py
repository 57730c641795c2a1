"""Data constants and flag checks, importable without torch: the CLIs check their flags
(--tta) and tools.export writes the preprocessing before anything heavy is imported."""

# torchvision's ImageNet statistics: what --normalize imagenet subtracts and divides by.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TTA = 10


def check_tta(n: int) -> None:
    """The one check of --tta (test.py, main.py --test, the Scorer, TTACrops)."""
    if not 1 <= n <= MAX_TTA:
        raise ValueError(f"--tta must be between 1 and {MAX_TTA} (the number of fixed crops), got {n}")
