"""The GPU check's view of the machine (bench/GPU.md): the card's short name, what the
machine holds (torch, the card, compilers, the carried packages), and its measured bf16
matrix and copy rates."""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import os
import platform
import re
import shutil
import subprocess
import sysconfig

from bench.gpu_records import emit


# Packages the GPU machine's image lacks and bench/gpu_prepare.sh brings as wheels.
CARRIED = ("tensorboardX", "fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "python-multipart",
           "prometheus-client", "fastapi-offline")


def card_slug() -> str:
    """'h200' for 'NVIDIA H200': the <card> of bench/results/<date>_<card>.jsonl."""
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def cmd_env(_args) -> int:
    import torch
    import torchvision
    from importlib import metadata
    rec = {"name": "env", "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "cuda_available": torch.cuda.is_available(),
           "cpu_count": os.cpu_count(), "card": card_slug()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    try:
        st = os.statvfs("/dev/shm")
        rec["dev_shm_gib"] = round(st.f_frsize * st.f_blocks / 2**30, 1)  # DataLoader workers' batches live here
    except OSError:
        rec["dev_shm_gib"] = None
    # torch.compile's Triton launcher is built with a C compiler against Python.h.
    rec["cc"] = shutil.which("gcc") or shutil.which("cc")
    rec["python_h"] = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    versions = {}
    for name in CARRIED + ("triton", "numpy", "pillow", "pytest", "hypothesis", "httpx", "onnx", "onnxscript",
                           "onnxruntime", "protobuf", "pytest-xdist"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    rec["packages"] = versions
    try:
        rec["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                            "power.limit,temperature.gpu,utilization.gpu", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rec["nvidia_smi"] = None
    emit(rec)
    return 0


def cmd_peak(args) -> int:
    """The two ceilings of this card, measured: a bf16 matrix product on random data and
    a device-to-device copy (bytes read plus written), median of `reps` timed runs with
    CUDA events after warm-ups."""
    import torch
    if not torch.cuda.is_available():
        emit({"name": "peak", "skipped": "no CUDA device"})
        return 0

    def median_ms(fn, reps):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    n = args.matrix
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, args.reps)
    nbytes = args.copy_gib * 2**30
    x = torch.rand(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), args.reps)
    emit({"name": "peak", "bf16_matmul_tflops": 2 * n**3 / ms / 1e9, "matmul_size": n,
          "copy_tb_per_s": 2 * nbytes / copy_ms / 1e9, "copy_gib": args.copy_gib, "reps": args.reps})
    return 0
