"""Where and how tensors run: device, mixed precision, memory format, ranks, and how
images reach the device. Built once by the CLI from its flags, then handed to the
training and inference loops."""
import dataclasses
from dataclasses import dataclass, field

import torch

from dataset.transforms import uint8_to_input

from engine.distributed import DistInfo
from engine.flags import UINT8_TRANSFER_CHOICES
from engine.loaders import available_cores


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
    # Pillow decodes a large JPEG already reduced, its shorter side kept at least twice the
    # model's resize size and 512 px (dataset.images.draft): on unless --exact_decode.
    jpeg_draft: bool = False
    # torch's intra-op threads, set by configure_backends (None: torch's own default).
    threads: int = None

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


# Backbones that bf16 autocast makes faster on a CPU with native bf16 (python -m
# bench.cpu_layouts) and whose scores it keeps: measured against float32 on real
# photographs with trained checkpoints (python -m bench.score_cost; the bounds are
# tests/test_cpu_precision.py's: Spearman of the means >= 0.999, every paper metric within
# 0.002, no mean moved by more than 0.05). None qualifies yet: VGG16 is 2-3x faster in
# bf16 but missed the bounds on the checkpoints this machine can make (Spearman 0.9981 to
# 0.9991, a paper metric moved by up to 0.0059), and tiny_cnn keeps its scores but gains
# nothing. `--amp on` still asks for bf16 (docs/performance.md has the figures).
CPU_BF16_BACKBONES = frozenset()
# Backbones whose forward pass on a CPU is faster in channels_last, by precision: measured
# with python -m bench.cpu_layouts (docs/performance.md, "What auto chooses").
CPU_CHANNELS_LAST = {"bf16": frozenset({"vgg16"}),
                     "float32": frozenset({"vgg16"})}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) as torch sees it.
    Without either, bf16 autocast is emulated and slower than float32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported():
            return True
    return False


def resolve_speed_flags(amp: str, channels_last: str, device: torch.device, base_model: str = None,
                        training: bool = False) -> tuple:
    """(bf16 autocast, channels_last) for --amp and --channels_last ('auto', 'on', 'off').

    'auto' on CUDA: bf16 where the device supports it, and channels_last. On a CPU, for
    scoring (`training` False): bf16 where the processor has it natively and the backbone
    keeps its scores under it (CPU_BF16_BACKBONES), and channels_last where it is the
    faster layout for the backbone at that precision (CPU_CHANNELS_LAST). Training on a
    CPU stays float32 in the default layout unless asked."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    cpu_scoring = device.type == "cpu" and not training
    auto_amp = (on_cuda and torch.cuda.is_bf16_supported()) or (
        cpu_scoring and base_model in CPU_BF16_BACKBONES and cpu_has_native_bf16())
    use_amp = {"on": True, "off": False, "auto": auto_amp}[amp]
    auto_cl = on_cuda or (cpu_scoring and base_model in CPU_CHANNELS_LAST["bf16" if use_amp else "float32"])
    use_cl = {"on": True, "off": False, "auto": auto_cl}[channels_last]
    return use_amp, use_cl


def resolve_threads(flag, device: torch.device):
    """torch's intra-op threads: --threads, or on a CPU one per core this process may use
    (taskset and cpusets respected, unlike torch's own count). On CUDA the network runs on
    the device: None leaves torch's default."""
    if flag is not None:
        return flag
    return available_cores() if torch.device(device).type == "cpu" else None


def configure_backends(rt: Runtime) -> None:
    """Process-wide settings for a run on rt.device: torch's intra-op threads (rt.threads,
    when set). On CUDA: cudnn.benchmark (every batch has the same shape, so cuDNN
    autotunes once), and with bf16 autocast off, float32 convolutions in IEEE float32:
    cuDNN's default runs them in TF32 (a 10-bit mantissa), which would keep `--amp off`
    from matching the CPU's float32 predictions."""
    if rt.threads is not None:
        torch.set_num_threads(rt.threads)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # The legacy switch, not cudnn.conv.fp32_precision: it exists on every torch this
        # runs on, and mixing the two APIs makes torch refuse to read the flag.
        torch.backends.cudnn.allow_tf32 = rt.amp


def describe_runtime(rt: Runtime, model_args: dict, workers: int = None, worker_name: str = "loader worker") -> str:
    """The one line the commands print at start: what --device, --amp, --channels_last,
    --threads and --exact_decode resolved to, so that a user sees what 'auto' chose."""
    cpu = rt.device.type == "cpu"
    native = f", {'native' if cpu_has_native_bf16() else 'no native'} bf16" if cpu else ""
    parts = [f"{rt.device}{native}: {model_args['base_model']} in {'bf16 autocast' if rt.amp else 'float32'}",
             "channels_last" if rt.channels_last else "contiguous layout",
             f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"]
    if workers is not None:
        plural = worker_name + ("es" if worker_name.endswith("s") else "s")  # "decoding processes"
        parts.append(f"{workers} {worker_name if workers == 1 else plural}")
    parts.append("JPEGs on the device" if rt.gpu_decode else ("JPEG draft decoding" if rt.jpeg_draft else "exact decoding"))
    return "runtime: " + ", ".join(parts)


def resolve_uint8_transfer(flag: str, device: torch.device) -> bool:
    """--uint8_transfer: 'auto' sends uint8 crops to CUDA devices, where converting and
    normalising is nearly free, and keeps the float path on CPU, where the work would
    only move from the loader workers to the main process."""
    if flag not in UINT8_TRANSFER_CHOICES:
        raise ValueError(f"--uint8_transfer must be one of {', '.join(UINT8_TRANSFER_CHOICES)}, got {flag!r}")
    return {"on": True, "off": False, "auto": torch.device(device).type == "cuda"}[flag]
