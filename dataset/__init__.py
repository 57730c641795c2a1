from .datasets import ImageDataset
from .images import IMAGE_EXTENSIONS, ImageReadError, find_images, load_rgb
from .labels import LabelFileError, LabelTable, read_label_csv
from .samplers import EpochShuffleSampler, ShardSampler
from .transforms import TTACrops, eval_transform, train_transform
