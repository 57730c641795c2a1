"""The model's constants and flag values, importable without torch: the CLIs' parsers and
usage checks (`--help`, a bad flag) read them before anything heavy is imported."""

# The ratings 1..10 of AVA: the length of every predicted and true distribution.
NUM_BINS = 10

HEADS = ("reference", "paper")
# What a new model is when no flag says otherwise: the reference's network.
DEFAULT_BASE_MODEL = "vgg16"
DEFAULT_DROPOUT = 0.75
DEFAULT_HEAD = "reference"
NORMALIZE_CHOICES = ("imagenet", "none")

# The paper's MobileNet and Inception-v2 have no torchvision twin: mobilenet_v2/v3 and
# inception_v3 are the nearest; the others are strong modern backbones.
CURATED_TORCHVISION = ("mobilenet_v2", "mobilenet_v3_large", "inception_v3", "resnet50", "efficientnet_b0", "convnext_tiny")
# Every backbone registered by name (model/registry.py registers exactly these).
BACKBONE_NAMES = tuple(sorted(("vgg16", "tiny_cnn") + CURATED_TORCHVISION))
