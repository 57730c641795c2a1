"""The benchmark's figures: each method measures one group, reference first, and emits
one record per variant (see bench/bench.py for what each group means)."""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import dataclasses
import gc
import itertools
import time

import numpy as np

import torch
from torch.utils.flop_counter import FlopCounterMode

from dataset import ImageDataset, eval_transform, load_rgb, train_transform
from dataset.labels import LabelTable
from dataset.sources import table_source
from engine.loaders import make_loader
from engine.score.collection import collection_loader, scored_rows
from engine.score.inference import predict
from engine.metrics import mean_and_std
from engine.runtime import Runtime, configure_backends, resolve_speed_flags, resolve_uint8_transfer
from engine.train.epoch import EpochProgress, train_one_epoch
from model import build_model, emd_per_sample

from .reference_loop import reference_predict_files, reference_predict_tensors, reference_train_steps
from .timing import TimedBatches, repeat, timed

ALL = ("decode_1core", "loader", "train_synthetic", "infer_synthetic", "train_jpeg", "infer_jpeg")
NEED_FILES = ("decode_1core", "loader", "train_jpeg", "infer_jpeg")
# What --variants selects from (the speed flag combinations; not every one applies to every device).
VARIANTS = ("reference", "fp32", "channels_last", "bf16", "bf16+channels_last", "bf16+channels_last+compile")
# Small learning rates: random weights and random targets must not blow up in a few steps.
CONV_BASE_LR, DENSE_LR = 1e-4, 1e-3


def variant_name(amp: bool, channels_last: bool, compiled: bool = False, loader: str = "") -> str:
    """'ours bf16+channels_last', and for the JPEG figures the loader path when it is not
    the float one: 'ours bf16+channels_last, uint8 loader' or '..., device decode'."""
    parts = (["bf16"] if amp else []) + (["channels_last"] if channels_last else []) + (["compile"] if compiled else [])
    return "ours " + ("+".join(parts) or "fp32") + {"": "", "float": "", "uint8": ", uint8 loader",
                                                     "device_decode": ", device decode"}[loader]


def reference_backends() -> None:
    """torch's defaults, which the reference kept: no cuDNN autotuning, TF32 convolutions."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = True


class Bench:
    def __init__(self, args, model_args, device, data, emit):
        self.args, self.model_args, self.device, self.data, self.emit = args, model_args, device, data, emit
        self.cuda = device.type == "cuda"
        size = model_args["image_size"]
        self.shape = (3, size, size)
        self.default_flags = resolve_speed_flags("auto", "auto", device)  # what main.py and test.py pick
        self.default_uint8 = resolve_uint8_transfer("auto", device)
        self.selected = set(args.variants.split(",")) if getattr(args, "variants", None) else set(VARIANTS)

    # ----- helpers -----
    def variants(self) -> list:
        """(amp, channels_last, compile) combinations that apply to the device."""
        out = [(False, False, False), (False, True, False)]
        if self.cuda and torch.cuda.is_bf16_supported():
            out += [(True, False, False), (True, True, False)]
            if not self.args.no_compile:
                out.append((True, True, True))
        return [v for v in out if variant_name(*v)[len("ours "):] in self.selected]

    def model(self, channels_last=False):
        torch.manual_seed(0)
        model = build_model(self.model_args, pretrained="none").to(self.device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def optimizer(self, model):
        # As main.py builds it: SGD with momentum, the reference's two learning rates,
        # multi-tensor (foreach) updates on CUDA.
        return torch.optim.SGD(model.param_groups(CONV_BASE_LR, DENSE_LR), momentum=0.9,
                               foreach=True if self.cuda else None)

    def targets(self, n):
        return torch.softmax(torch.randn(n, 10), dim=1)

    def record(self, figure, variant, data, result, baseline=None, ratio_to="reference", **extra):
        rec = {"figure": figure, "variant": variant, "data": data, **result, **extra}
        if baseline is not None and variant != ratio_to:
            rec["ratio"], rec["ratio_to"] = result["images_per_s"] / baseline, ratio_to
        self.emit(rec)
        return result["images_per_s"]

    def cleanup(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def runtime(self, amp, channels_last, uint8=False):
        return Runtime(self.device, amp, channels_last, show_progress=False, uint8_transfer=uint8).for_model(self.model_args)

    def train_dataset(self, paths, uint8=False):
        dists = self.targets(len(paths))
        return ImageDataset(paths, train_transform(self.model_args, uint8=uint8), dists, self.shape)

    def training_flops(self) -> float:
        """FLOPs of one training image (forward and backward of the network and the loss),
        counted by torch's FlopCounterMode on a batch of 2 (BatchNorm needs more than one)."""
        model = self.model()
        x = torch.randn(2, *self.shape, device=self.device)
        with FlopCounterMode(display=False) as counter:
            emd_per_sample(model(x), self.targets(2).to(self.device)).sum().backward()
        del model
        return counter.get_total_flops() / 2

    def sampler(self, n_files, n_samples):
        """A shuffled list of `n_samples` indices cycling over the files (fewer files than
        samples is fine: they stay in the page cache either way)."""
        g = torch.Generator().manual_seed(0)
        return [int(i) for _, i in zip(range(n_samples), itertools.cycle(torch.randperm(n_files, generator=g).tolist()))]

    # ----- figures -----
    def decode_1core(self):
        """Per-core cost of getting a crop: decode + EXIF + resize + crop + to tensor.
        The data sets are timed image by image in turn (original n, cache n, original
        n+1, ...), so a burst of other work on the machine slows both alike."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            transform = eval_transform(self.model_args)
            seconds = dict.fromkeys(self.data, 0.0)
            for paths in self.data.values():
                transform(load_rgb(paths[0]))  # warm the code paths
            for n in range(len(self.data["original"])):
                for data, paths in self.data.items():
                    start = time.perf_counter()
                    transform(load_rgb(paths[n]))
                    seconds[data] += time.perf_counter() - start
            base = None
            for data, paths in self.data.items():
                result = {"images_per_s": len(paths) / seconds[data], "images": len(paths), "workers": 0}
                rate = self.record("decode_1core", "pillow", data, result, base, ratio_to="original")
                base = base or rate
        finally:
            torch.set_num_threads(threads)

    def loader(self):
        args, base = self.args, None
        rt = self.runtime(*self.default_flags, self.default_uint8)
        total = args.warmup + args.steps
        for data, paths in self.data.items():
            loader = make_loader(self.train_dataset(paths, rt.uint8_transfer), args.batch_size, args.workers, rt,
                                 sampler=self.sampler(len(paths), total * args.batch_size))
            timer = TimedBatches(loader, total, args.warmup, args.batch_size)
            for _ in timer:
                pass
            result = timer.finish(self.device)
            del result["loader_wait_ms_per_step"]  # here the loader is all there is
            per_worker = result["images_per_s"] / max(args.workers, 1)
            rate = self.record("loader", f"make_loader, {args.workers} workers" + (", uint8" if rt.uint8_transfer else ""),
                               data, result, base, ratio_to="original", workers=args.workers,
                               images_per_s_per_worker=per_worker, batch_size=args.batch_size)
            base = base or rate
            del loader, timer
            self.cleanup()

    def train_synthetic(self):
        args, B = self.args, self.args.batch_size
        total = args.warmup + args.steps
        images, targets = torch.randn(B, *self.shape, device=self.device), self.targets(B).to(self.device)
        flops = self.training_flops()
        # Achieved rate: the counted FLOPs of the images trained per second (a bf16 peak
        # to divide it by is the matrix rate measured on the same card).
        work = {"gflop_per_image": flops / 1e9}

        def tflops(result):
            return {**work, "achieved_tflops": result["images_per_s"] * flops / 1e12}
        base = None
        if "reference" in self.selected:
            reference_backends()
            model = self.model()
            timer = TimedBatches(repeat({"image": images, "target": targets}, total), total, args.warmup, B)
            reference_train_steps(model, self.optimizer(model), timer, self.device)
            result = timer.finish(self.device)
            base = self.record("train_synthetic", "reference", "synthetic", result, batch_size=B, **tflops(result))
            del model
        batch = {"index": torch.arange(B), "image": images, "target": targets, "ok": torch.ones(B, dtype=torch.bool),
                 "error": [""] * B}
        for amp, cl, comp in self.variants():
            result = self._train_ours(repeat(batch, total), total, amp, cl, comp)
            self.record("train_synthetic", variant_name(amp, cl, comp), "synthetic", result, base, batch_size=B,
                        **tflops(result))

    def _train_ours(self, source, total, amp, channels_last, compiled):
        """Our training step (engine.train.epoch.train_one_epoch) as main.py sets it up."""
        args = self.args
        rt = self.runtime(amp, channels_last)  # uint8 batches are converted whatever its flag says
        configure_backends(rt)  # as main.py and test.py set them
        model = self.model(channels_last)
        net = torch.compile(model) if compiled else model
        timer = TimedBatches(source, total, args.warmup, args.batch_size)
        train_one_epoch(net, timer, self.optimizer(model), rt, 1, EpochProgress(), log=lambda *a, **k: None)
        result = timer.finish(self.device)
        del model, net
        self.cleanup()
        return result

    def infer_synthetic(self):
        args, B = self.args, self.args.infer_batch_size
        n = -(-args.infer_images // B) * B  # whole batches: a smaller last one would recompile
        images = torch.randn(n, *self.shape, device=self.device)
        base = None
        if "reference" in self.selected:
            reference_backends()
            model = self.model()
            reference_predict_tensors(model, images[:max(args.warmup, 1)])
            _, seconds = timed(lambda: reference_predict_tensors(model, images), self.device)
            base = self.record("infer_synthetic", "reference", "synthetic", {"images_per_s": n / seconds}, batch_size=1)
            del model
        batches = [{"index": torch.arange(i, i + B), "image": images[i:i + B], "ok": torch.ones(B, dtype=torch.bool),
                    "error": [""] * B} for i in range(0, n, B)]
        for amp, cl, comp in self.variants():
            rt = self.runtime(amp, cl)
            configure_backends(rt)
            model = self.model(cl)
            net = torch.compile(model) if comp else model
            predict(net, batches[:1], rt)  # warm-up: cuDNN autotuning, compilation
            (_, dists, _), seconds = timed(lambda: predict(net, batches, rt), self.device)
            mean_and_std(dists)
            self.record("infer_synthetic", variant_name(amp, cl, comp), "synthetic", {"images_per_s": n / seconds}, base,
                        batch_size=B)
            del model, net
            self.cleanup()

    def train_jpeg(self):
        args, B = self.args, self.args.batch_size
        total = args.warmup + args.steps
        originals = self.data["original"]
        base = None
        if "reference" in self.selected:
            # A plain DataLoader (no pinned memory, workers restarted each epoch).
            reference_backends()
            plain = torch.utils.data.DataLoader(self.train_dataset(originals), batch_size=B, num_workers=args.workers,
                                                sampler=self.sampler(len(originals), total * B))
            model = self.model()
            timer = TimedBatches(plain, total, args.warmup, B)
            reference_train_steps(model, self.optimizer(model), timer, self.device)
            base = self.record("train_jpeg", "reference", "original", timer.finish(self.device), batch_size=B,
                               workers=args.workers)
            del model, plain, timer
        amp, cl = self.default_flags
        uint8, cache = self.default_uint8, list(self.data)[-1]
        # Every data set with the default loader path (uint8 on CUDA, float on CPU), the
        # cache with the other path too, and the cache compiled on CUDA.
        runs = [(data, uint8, False) for data in self.data] + [(cache, not uint8, False)]
        if self.cuda and not args.no_compile:
            runs.append((cache, uint8, True))
        for data, u8, comp in runs:
            paths = self.data[data]
            loader = make_loader(self.train_dataset(paths, u8), B, args.workers, self.runtime(amp, cl, u8),
                                 sampler=self.sampler(len(paths), total * B), drop_last=comp)
            result = self._train_ours(loader, total, amp, cl, comp)
            self.record("train_jpeg", variant_name(amp, cl, comp, "uint8" if u8 else "float"), data, result, base,
                        batch_size=B, workers=args.workers)
            del loader
            self.cleanup()

    def infer_jpeg(self):
        args, base = self.args, None
        if "reference" in self.selected:
            reference_backends()
            model = self.model()
            paths = [p for _, p in zip(range(args.infer_images), itertools.cycle(self.data["original"]))]
            reference_predict_files(model, self.model_args, paths[:1], self.device)
            _, seconds = timed(lambda: reference_predict_files(model, self.model_args, paths, self.device), self.device)
            base = self.record("infer_jpeg", "reference", "original", {"images_per_s": len(paths) / seconds},
                               batch_size=1)
            del model
        amp, cl = self.default_flags
        rt = self.runtime(amp, cl)
        configure_backends(rt)
        model = self.model(cl).eval()
        with torch.no_grad(), rt.autocast():  # warm-up: cuDNN autotuning for the batch shape
            model(rt.images_to_device(torch.zeros(args.infer_batch_size, *self.shape)))
        # test.py's scoring loop (collection_loader + scored_rows; its part files are not
        # written) with float crops from the workers and with the device decode on every
        # data set, the uint8 loader on the cache.
        cache = list(self.data)[-1]
        runs = [(data, "float") for data in self.data] + [(cache, "uint8")] + [(data, "device_decode") for data in self.data]
        for data, loader_path in runs:
            paths = [p for _, p in zip(range(args.infer_images), itertools.cycle(self.data[data]))]
            start = time.perf_counter()
            dists = self._infer_files(model, paths, rt, loader_path)
            mean_and_std(dists)
            seconds = time.perf_counter() - start
            self.record("infer_jpeg", variant_name(amp, cl, loader=loader_path), data,
                        {"images_per_s": len(paths) / seconds}, base, batch_size=args.infer_batch_size,
                        workers=args.workers)
        del model
        self.cleanup()

    def _infer_files(self, model, paths, rt, loader_path):
        """(N, 10) distributions of `paths` (repeats allowed) through test.py's loop."""
        rt = dataclasses.replace(rt, uint8_transfer=loader_path == "uint8", gpu_decode=loader_path == "device_decode")
        table = LabelTable(csv_path="", ids=[str(n) for n in range(len(paths))], paths=paths, lines=[], dists=None)
        loader = collection_loader([table_source(table)], self.model_args, rt, self.args.infer_batch_size,
                                   self.args.workers)
        dists = [row[6] for rows in scored_rows(model, loader, rt) for row in rows if row[4] == "ok"]
        return np.array(dists).reshape(-1, 10)
