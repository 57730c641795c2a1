"""The network, its backbones, loss and checkpoint format. Names are imported on first use
(PEP 562), so that `from model.constants import ...` does not import torch."""
import importlib

_HOMES = {"CheckpointError": "checkpoint", "load_for_inference": "checkpoint", "save_checkpoint": "checkpoint",
          "strip_wrapper_prefixes": "checkpoint", "unwrap": "checkpoint",
          "emd_loss": "loss", "emd_per_sample": "loss",
          "NIMA": "nima", "build_model": "nima", "default_model_args": "nima",
          "BACKBONES": "registry", "PretrainedWeightsError": "registry", "get_backbone": "registry",
          "list_backbones": "registry"}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
