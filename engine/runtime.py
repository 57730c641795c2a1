"""Where and how tensors run: device, mixed precision, memory format, ranks. Built once
by the CLI from its flags, then handed to the training and inference loops."""
from dataclasses import dataclass, field

import torch

from .distributed import DistInfo


@dataclass
class Runtime:
    device: torch.device
    amp: bool = False             # bf16 autocast for the network; loss and metrics stay float32
    channels_last: bool = False
    dist: DistInfo = field(default_factory=DistInfo)
    show_progress: bool = True

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
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
