from .checkpoint import CheckpointError, load_for_inference, save_checkpoint, strip_wrapper_prefixes, unwrap
from .loss import emd_loss, emd_per_sample
from .nima import NIMA, build_model, default_model_args
from .registry import BACKBONES, PretrainedWeightsError, get_backbone, list_backbones
