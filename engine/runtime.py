"""Where and how tensors run: device, mixed precision, memory format, ranks, and how
images reach the device. Built once by the CLI from its flags, then handed to the
training and inference loops."""
import dataclasses
from dataclasses import dataclass, field

import torch

from dataset.transforms import uint8_to_input

from engine.distributed import DistInfo


@dataclass
class Runtime:
    device: torch.device
    amp: bool = False             # bf16 autocast for the network; loss and metrics stay float32
    channels_last: bool = False
    dist: DistInfo = field(default_factory=DistInfo)
    show_progress: bool = True
    # Loader workers hand uint8 crops (a quarter of float32's bytes through shared memory,
    # pinning and the copy) and the device converts and normalises them. The loaders'
    # transforms follow this flag; images_to_device follows the batch's dtype.
    uint8_transfer: bool = False
    # The model's input normalisation ('imagenet' or 'none'), applied on the device to
    # uint8 batches; set from the model's arguments with for_model().
    normalize: str = None
    # Scoring decodes JPEGs on the device in batches (engine/score/gpu_decode.py) instead of
    # with Pillow in the loader workers.
    gpu_decode: bool = False

    def for_model(self, model_args: dict) -> "Runtime":
        """This runtime with the input normalisation of the model about to run."""
        return dataclasses.replace(self, normalize=model_args["normalize"])

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch as the network's input on the device. uint8 batches (B, 3, H, W) are
        converted to float32, scaled by 1/255 and normalised there; float batches,
        already normalised by the CPU transforms, pass unchanged."""
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("a uint8 batch reached the device, but the runtime does not know the model's "
                                 "input normalisation: build it with Runtime.for_model(model_args)")
            return uint8_to_input(images, self.normalize, self.channels_last)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @property
    def progress(self) -> bool:
        return self.show_progress and self.dist.is_main


def resolve_speed_flags(amp: str, channels_last: str, device: torch.device) -> tuple:
    """'auto' turns bf16 autocast and channels_last on for CUDA devices that support
    them and off on CPU, where float32 stays the default."""
    on_cuda = device.type == "cuda"
    use_amp = {"on": True, "off": False, "auto": on_cuda and torch.cuda.is_bf16_supported()}[amp]
    use_cl = {"on": True, "off": False, "auto": on_cuda}[channels_last]
    return use_amp, use_cl


def configure_backends(rt: Runtime) -> None:
    """Process-wide settings for a run on rt.device. On CUDA: cudnn.benchmark (every batch
    has the same shape, so cuDNN autotunes once), and with bf16 autocast off, float32
    convolutions in IEEE float32: cuDNN's default runs them in TF32 (a 10-bit mantissa),
    which would keep `--amp off` from matching the CPU's float32 predictions. Nothing to
    set on CPU."""
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # The legacy switch, not cudnn.conv.fp32_precision: it exists on every torch this
        # runs on, and mixing the two APIs makes torch refuse to read the flag.
        torch.backends.cudnn.allow_tf32 = rt.amp


UINT8_TRANSFER_CHOICES = ("auto", "on", "off")


def resolve_uint8_transfer(flag: str, device: torch.device) -> bool:
    """--uint8_transfer: 'auto' sends uint8 crops to CUDA devices, where converting and
    normalising is nearly free, and keeps the float path on CPU, where the work would
    only move from the loader workers to the main process."""
    if flag not in UINT8_TRANSFER_CHOICES:
        raise ValueError(f"--uint8_transfer must be one of {', '.join(UINT8_TRANSFER_CHOICES)}, got {flag!r}")
    return {"on": True, "off": False, "auto": torch.device(device).type == "cuda"}[flag]
