"""Export a trained NIMA model for deployment without this repository (or without
PyTorch, for ONNX).

    python -m tools.export --model runs/demo/best.pth --format onnx --out nima.onnx
    python -m tools.export --model runs/demo/best.pth --format torchscript --out nima.pt
    python -m tools.export --model epoch-34.pth --normalize imagenet --format onnx --out nima.onnx

The exported model takes a float32 batch of preprocessed images (N, 3, H, W), any N,
and returns the predicted distribution over the ratings 1..10 (N, 10). FILE.json
beside it says how to preprocess (resize, crop, scale, normalise) and how to read the
output. Before anything is written the export is run on random images at two batch
sizes and compared with PyTorch (onnxruntime for ONNX); the largest difference is
printed and must stay within --atol.

Exit codes: 0 exported; 1 the export failed or disagrees with PyTorch (nothing written);
2 bad usage, unreadable checkpoint, or onnx/onnxruntime missing (the pip command is
printed).
"""
if not __package__:  # run by path (python tools/export.py): run as python -m tools.export
    import _by_path
    _by_path.run_as_module(__file__)

import importlib.util
import os
import sys
import warnings

# Only torch-free modules at the top: --help and a usage error answer without importing
# torch; the functions that need it import it.
from dataset.constants import IMAGENET_MEAN, IMAGENET_STD
from engine.flags import ArgumentParser, HelpFormatter, add_normalize_flag
from fileio import OutputWriteError, atomic_path, atomic_write_json
from model.constants import NUM_BINS

# onnxscript: torch.onnx's exporter builds the graph with it.
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
CHECK_BATCH_SIZES = (1, 3)  # neither is the batch size of the example input (2): proves the batch is dynamic
EXAMPLE_BATCH = 2
ONNX_SIZE_LIMIT = 2 ** 31  # protobuf's limit for a single-file ONNX model


class ExportFailed(RuntimeError):
    pass


class ParityError(Exception):
    def __init__(self, diff):
        super().__init__(diff)
        self.diff = diff


def get_args_parser():
    p = ArgumentParser(description="Export a NIMA checkpoint to ONNX or TorchScript, checked against PyTorch.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint: ours or the reference's released state_dict")
    add_normalize_flag(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="what to export to")
    p.add_argument("--out", required=True, help="output file (FILE.json is written beside it)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18: onnxruntime >= 1.14 and most runtimes run it)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |export - PyTorch| on the check inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check images")
    return p


def missing_onnx_modules() -> list:
    return [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]


def random_images(batch: int, model_args: dict, generator):
    """Images as the preprocessing makes them: pixels in [0, 1], then maybe normalised."""
    import torch
    size = model_args["image_size"]
    x = torch.rand(batch, 3, size, size, generator=generator)
    if model_args["normalize"] == "imagenet":
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x


def export_torchscript(model, example, path):
    import torch
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream in favour of torch.export, but TorchScript is
        # what C++ (libtorch) and older deployments load; the warning is not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        # Traced, not scripted: torchvision's Inception/GoogLeNet forward returns a
        # namedtuple under scripting. Our own check below replaces the tracer's.
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(path)
        loaded = torch.jit.load(path)
    return lambda x: loaded(x)


def export_onnx(model, example, path, opset):
    import onnxruntime
    import torch
    torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["distribution"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=opset,
                      external_data=False, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def max_abs_diff(model, run_export, model_args, seed) -> float:
    import torch
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in CHECK_BATCH_SIZES:
        x = random_images(batch, model_args, generator)
        with torch.no_grad():
            expected = model(x)
            got = run_export(x)
        if got.shape != expected.shape:
            raise ValueError(f"the export returned shape {tuple(got.shape)} for a batch of {batch}, PyTorch {tuple(expected.shape)}")
        worst = max(worst, (got.float() - expected).abs().max().item())
    return worst


def preprocessing(model_args: dict, fmt: str, checkpoint: str, diff: float) -> dict:
    """What a deployment needs besides the model file (it mirrors dataset.transforms.eval_transform)."""
    normalize = ({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
                 if model_args["normalize"] == "imagenet" else None)
    return {
        "format": fmt,
        "input": {"name": "images", "shape": ["batch", 3, model_args["image_size"], model_args["image_size"]],
                  "dtype": "float32", "layout": "NCHW, RGB"},
        "output": {"name": "distribution", "shape": ["batch", NUM_BINS], "dtype": "float32",
                   "meaning": "probabilities of the ratings 1..10; each row sums to 1"},
        "preprocessing": {
            "resize_size": model_args["resize_size"],
            "resize": "shorter side to resize_size, aspect ratio kept",
            "interpolation": "bilinear", "antialias": True,
            "image_size": model_args["image_size"], "crop": "centre crop image_size x image_size",
            "scale": "pixel / 255, into [0, 1]",
            "normalize": normalize,  # None: the [0, 1] pixels go in as they are (the reference's 2018-2020 release)
            "normalization": model_args["normalize"],  # the name: 'imagenet' or 'none'
        },
        "rating_bins": list(range(1, NUM_BINS + 1)),
        "score": "mean = sum_i i * p_i; spread = sqrt(sum_i p_i * (i - mean)^2)",
        "model_args": model_args,
        "source_checkpoint": os.path.abspath(checkpoint),
        "max_abs_diff_vs_pytorch": diff,
    }


def main(args) -> int:
    if args.format == "onnx":
        missing = missing_onnx_modules()
        if missing:
            print(f"error: --format onnx needs {', '.join(ONNX_MODULES)} (missing: {', '.join(missing)}); "
                  f"install them with: pip install -r requirements-export.txt", file=sys.stderr)
            return 2
    if args.atol <= 0:
        print(f"error: --atol must be > 0, got {args.atol}", file=sys.stderr)
        return 2
    import torch

    from model import CheckpointError, load_for_inference
    try:
        model, model_args = load_for_inference(args.model, normalize=args.normalize)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.format == "onnx" and size >= ONNX_SIZE_LIMIT:
        print(f"error: {model_args['base_model']} holds {size / 2**30:.1f} GiB of weights, over the 2 GiB of a "
              f"single-file ONNX model; export it with --format torchscript", file=sys.stderr)
        return 2
    example = random_images(EXAMPLE_BATCH, model_args, torch.Generator().manual_seed(args.seed + 1))
    try:
        with atomic_path(args.out) as tmp:  # nothing appears at --out unless the check passes
            print(f"exporting {model_args['base_model']} ({model_args.get('head', 'reference')} head, "
                  f"{model_args['image_size']} px) to {args.format} ...")
            try:
                if args.format == "onnx":
                    run_export = export_onnx(model, example, tmp, args.opset)
                else:
                    run_export = export_torchscript(model, example, tmp)
            except Exception as exc:  # the exporters raise many types; say which step failed
                raise ExportFailed(f"{args.format} export of {model_args['base_model']} failed: "
                                   f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
            diff = max_abs_diff(model, run_export, model_args, args.seed)
            print(f"max |{args.format} - PyTorch| = {diff:.3g} on random inputs, batch sizes "
                  f"{' and '.join(map(str, CHECK_BATCH_SIZES))} (limit {args.atol:g})")
            if not diff <= args.atol:
                raise ParityError(diff)
        atomic_write_json(args.out + ".json", preprocessing(model_args, args.format, args.model, diff))
    except ExportFailed as exc:
        print(f"error: {exc}; nothing written", file=sys.stderr)
        return 1
    except ParityError as exc:
        print(f"error: the export differs from PyTorch by {exc.diff:.3g} > --atol {args.atol:g}; "
              f"nothing written", file=sys.stderr)
        return 1
    except OutputWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
