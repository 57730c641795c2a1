"""Preprocessing on the device: the uint8 loader path (workers hand uint8 crops, the
device converts and normalises) against the float path, and the JPEG decode path of the
scoring pipeline (engine/score/gpu_decode.py) against the Pillow path, on CPU; CUDA
variants skip without a GPU."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import default_collate

from bench.ava_like import ava_like_image
from conftest import write_tar
from dataset import ImageDataset, load_rgb
from dataset.transforms import TTACrops, eval_transform, train_transform, uint8_to_input
from dataset.labels import LabelTable
from dataset.sources import resolve_specs, table_source
from engine.loaders import make_loader
from engine.runtime import Runtime, resolve_uint8_transfer
from engine.score import gpu_decode
from engine.score.collection import collection_loader, scored_rows
from engine.score.gpu_decode import DeviceJpegDecoder, JpegBytesDataset, apply_orientation, jpeg_header
from model import build_model, default_model_args

MODEL_ARGS = {"resize_size": 72, "image_size": 64, "normalize": "imagenet"}
# Measured on CPU (torchvision's libjpeg-turbo decode against Pillow's, then its float
# antialiased resize against Pillow's fixed-point one): the decoded pixels are equal, and
# the resized crops differ by at most 1 in 0..255 units, by about 0.2 on average.
CPU_MAX_DIFF, CPU_MEAN_DIFF = 1, 0.35


def pil_images():
    """RGB images of a few shapes: landscape, portrait, square, smaller than the crop."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((90, 130), (150, 80), (72, 72), (50, 61))]


def float_input(x: torch.Tensor, device="cpu", channels_last=False) -> torch.Tensor:
    rt = Runtime(torch.device(device), channels_last=channels_last, show_progress=False).for_model(MODEL_ARGS)
    return rt.images_to_device(x)


# ----- the uint8 loader path -----

@pytest.mark.parametrize("normalize", ["imagenet", "none"])
def test_uint8_train_transform_equals_float_path(normalize):
    model_args = dict(MODEL_ARGS, normalize=normalize)
    rt = Runtime(torch.device("cpu"), show_progress=False).for_model(model_args)
    for n, img in enumerate(pil_images()):
        torch.manual_seed(n)  # the same random crop and flip draws on both paths
        expected = train_transform(model_args)(img)
        torch.manual_seed(n)
        crop = train_transform(model_args, uint8=True)(img)
        assert crop.dtype == torch.uint8 and crop.shape == expected.shape
        got = rt.images_to_device(crop.unsqueeze(0))[0]
        assert got.dtype == torch.float32
        # The same operations in the same order as ToTensor + Normalize: equal to the bit.
        assert (got - expected).abs().max().item() <= 1e-6
        assert torch.equal(got, expected)


def test_uint8_eval_and_tta_transforms_equal_float_path():
    images = pil_images()
    expected = torch.stack([eval_transform(MODEL_ARGS)(img) for img in images])
    crops = torch.stack([eval_transform(MODEL_ARGS, uint8=True)(img) for img in images])
    assert crops.dtype == torch.uint8
    got = float_input(crops, channels_last=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - expected).abs().max().item() <= 1e-6
    for n in (2, 10):
        expected = torch.stack([TTACrops(MODEL_ARGS, n)(img) for img in images])
        crops = torch.stack([TTACrops(MODEL_ARGS, n, uint8=True)(img) for img in images])
        assert crops.shape == expected.shape == (len(images), n, 3, 64, 64) and crops.dtype == torch.uint8
        # predict() flattens the crops of each image into the batch before the transfer.
        got = float_input(crops.flatten(0, 1))
        assert (got - expected.flatten(0, 1)).abs().max().item() <= 1e-6


def test_float_batches_pass_unchanged_and_uint8_needs_the_normalisation():
    x = torch.randn(2, 3, 8, 8)
    rt = Runtime(torch.device("cpu"), show_progress=False)
    assert rt.images_to_device(x) is x
    with pytest.raises(ValueError, match="for_model"):
        rt.images_to_device(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="normalize"):
        uint8_to_input(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "zscore")


def test_resolve_uint8_transfer():
    assert resolve_uint8_transfer("auto", torch.device("cpu")) is False
    assert resolve_uint8_transfer("auto", torch.device("cuda")) is True  # no GPU needed to decide
    assert resolve_uint8_transfer("on", torch.device("cpu")) is True
    assert resolve_uint8_transfer("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="uint8_transfer"):
        resolve_uint8_transfer("yes", torch.device("cpu"))


def loader_batches(paths, workers=0):
    """The first batch of the float and of the uint8 loader over `paths`."""
    rt = Runtime(torch.device("cpu"), show_progress=False).for_model(MODEL_ARGS)
    batches = {}
    for uint8 in (False, True):
        dataset = ImageDataset(paths, eval_transform(MODEL_ARGS, uint8=uint8), image_shape=(3, 64, 64))
        batches[uint8] = next(iter(make_loader(dataset, len(paths), workers, rt)))
    return rt, batches


def test_uint8_loader_batch_equals_float_loader_batch(jpegs):
    """Through ImageDataset and the DataLoader, in a worker process."""
    rt, batches = loader_batches([jpegs["o1"], jpegs["grey"], jpegs["png"], jpegs["o6"]], workers=1)
    assert batches[True]["image"].dtype == torch.uint8
    got, expected = rt.images_to_device(batches[True]["image"]), batches[False]["image"]
    assert (got - expected).abs().max().item() <= 1e-6


def test_uint8_loader_batch_with_an_unreadable_image(jpegs):
    """The blank standing in for an unreadable image is uint8 too: a float one would
    promote the whole batch to unnormalised floats."""
    rt, batches = loader_batches([jpegs["o1"], jpegs["truncated"], jpegs["grey"]])
    assert batches[True]["ok"].tolist() == batches[False]["ok"].tolist() == [True, False, True]
    assert batches[True]["image"].dtype == torch.uint8
    ok = batches[True]["ok"]
    got, expected = rt.images_to_device(batches[True]["image"]), batches[False]["image"]
    assert (got[ok] - expected[ok]).abs().max().item() <= 1e-6


# ----- the JPEG decode path, with device='cpu' -----

@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """AVA-like JPEGs with each EXIF orientation, and the files the device path must
    leave to Pillow (CMYK, PNG, truncated, zero-byte, missing)."""
    d = tmp_path_factory.mktemp("jpegs")
    out = {}
    for o in range(1, 9):
        exif = Image.Exif()
        exif[gpu_decode.EXIF_ORIENTATION] = o
        out[f"o{o}"] = d / f"o{o}.jpg"
        ava_like_image(np.random.default_rng(o), 120, 90).save(out[f"o{o}"], quality=90, exif=exif.tobytes())
    img = ava_like_image(np.random.default_rng(9), 97, 140)
    for name, kwargs in (("portrait", {}), ("progressive", {"progressive": True}), ("q95_444", {"subsampling": 0})):
        out[name] = d / f"{name}.jpg"
        img.save(out[name], quality=95 if name == "q95_444" else 90, **kwargs)
    out["grey"] = d / "grey.jpg"
    img.convert("L").save(out["grey"], quality=90)
    out["small"] = d / "small.jpg"  # below the resize size: upscaled by both paths
    img.resize((50, 60)).save(out["small"], quality=90)
    out["cmyk"] = d / "cmyk.jpg"
    img.convert("CMYK").save(out["cmyk"], quality=90)
    out["png"] = d / "p.png"
    img.save(out["png"])
    data = out["o1"].read_bytes()
    out["truncated"] = d / "truncated.jpg"
    out["truncated"].write_bytes(data[:len(data) // 2])
    out["zero"] = d / "zero.jpg"
    out["zero"].write_bytes(b"")
    out["missing"] = d / "missing.jpg"
    return {k: str(v) for k, v in out.items()}


DEVICE_NAMES = ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "portrait", "progressive", "q95_444", "grey", "small"]
PILLOW_NAMES = ["cmyk", "png", "truncated", "zero", "missing"]


def as_sources(paths):
    """The paths as the one source of a label CSV without labels (ids: their positions)."""
    table = LabelTable(csv_path="", ids=[str(n) for n in range(len(paths))], paths=list(paths), lines=[], dists=None)
    return [table_source(table)]


def pillow_decoder(tta=1, max_pixels=None):
    transform = eval_transform(MODEL_ARGS, uint8=True) if tta == 1 else TTACrops(MODEL_ARGS, tta, uint8=True)
    return ImageDataset([], transform, image_shape=(3, 64, 64) if tta == 1 else (tta, 3, 64, 64), max_pixels=max_pixels)


def decode_batch(paths, device, tta=1, max_pixels=None):
    """One collated batch of the workers' items (read in this process) and its decoded form."""
    pillow = pillow_decoder(tta, max_pixels)
    batch = default_collate(list(JpegBytesDataset(as_sources(paths), pillow)))
    return batch, DeviceJpegDecoder(pillow, MODEL_ARGS, device, tta)(batch)


def pillow_crops(paths, tta=1):
    transform = eval_transform(MODEL_ARGS, uint8=True) if tta == 1 else TTACrops(MODEL_ARGS, tta, uint8=True)
    return [transform(load_rgb(p)) for p in paths]


def test_jpeg_header_sends_odd_files_to_pillow(jpegs):
    limit = 10**8
    for name in DEVICE_NAMES:
        with open(jpegs[name], "rb") as f:
            header = jpeg_header(f.read(), limit)
        assert header is not None, name
    assert jpeg_header(open(jpegs["o6"], "rb").read(), limit) == (6, (90, 120))
    for name in ("cmyk", "png", "truncated", "zero"):
        with open(jpegs[name], "rb") as f:
            assert jpeg_header(f.read(), limit) is None, name
    assert jpeg_header(open(jpegs["o1"], "rb").read(), 120 * 90 - 1) is None  # above --max_image_pixels


def test_orientation_matches_pillow_exif_transpose():
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    for o in range(1, 9):
        exif = Image.Exif()
        exif[gpu_decode.EXIF_ORIENTATION] = o
        stored.info["exif"] = exif.tobytes()
        upright = np.asarray(ImageOps.exif_transpose(stored.copy()))
        tensor = torch.from_numpy(np.array(stored)).permute(2, 0, 1)
        assert np.array_equal(apply_orientation(tensor, o).permute(1, 2, 0).numpy(), upright), o


@pytest.mark.parametrize("tta", [1, 10])
def test_cpu_decode_crops_equal_pillow_crops(jpegs, tta):
    paths = [jpegs[n] for n in DEVICE_NAMES]
    batch, out = decode_batch(paths, "cpu", tta)
    assert all(len(d) > 0 for d in batch["data"])  # all taken by the device path
    assert out["ok"].all() and set(out) == {"ref", "source", "key", "order", "image", "ok", "error", "warning"}
    assert out["ref"] == paths and out["order"].tolist() == list(range(len(paths)))
    assert "data" not in out and out["image"].dtype == torch.uint8
    diffs = [(got.float() - ref.float()).abs() for got, ref in zip(out["image"], pillow_crops(paths, tta))]
    assert max(d.max().item() for d in diffs) <= CPU_MAX_DIFF
    assert max(d.mean().item() for d in diffs) <= CPU_MEAN_DIFF


def test_files_left_to_pillow_keep_its_crops_and_reasons(jpegs):
    paths = [jpegs[n] for n in PILLOW_NAMES] + [jpegs["o1"]]
    batch, out = decode_batch(paths, "cpu")
    assert [len(d) > 0 for d in batch["data"]] == [False] * len(PILLOW_NAMES) + [True]
    reference = ImageDataset(paths, eval_transform(MODEL_ARGS, uint8=True), image_shape=(3, 64, 64))
    for k in range(len(paths)):
        item = reference[k]
        assert (bool(out["ok"][k]), out["error"][k]) == (item["ok"], item["error"]), paths[k]
        if item["ok"] and k < len(PILLOW_NAMES):
            assert torch.equal(out["image"][k], item["image"])
    assert out["ok"].tolist() == [True, True, False, False, False, True]


def test_files_the_decoder_refuses_go_to_pillow_from_the_bytes_read(jpegs, tmp_path, monkeypatch):
    real = gpu_decode.decode_jpeg
    refused = open(jpegs["o3"], "rb").read()

    def picky(data, **kwargs):
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == refused for t in items):
            raise RuntimeError("decoder refused")
        return real(data, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", picky)
    copy = tmp_path / "o3.jpg"
    copy.write_bytes(refused)
    paths = [jpegs["o1"], str(copy), jpegs["o5"]]
    pillow = pillow_decoder()
    batch = default_collate(list(JpegBytesDataset(as_sources(paths), pillow)))
    copy.unlink()  # the file is gone by the time the batch is decoded: Pillow reads the bytes the worker read
    out = DeviceJpegDecoder(pillow, MODEL_ARGS, "cpu")(batch)
    assert out["ok"].tolist() == [True, True, True] and out["error"] == ["", "", ""]
    ref = pillow_crops([jpegs["o1"], jpegs["o3"], jpegs["o5"]])
    assert torch.equal(out["image"][1], ref[1])  # read by Pillow in the main process
    assert (out["image"][0].int() - ref[0].int()).abs().max() <= CPU_MAX_DIFF


def test_files_too_elongated_to_resize_go_to_pillow_which_names_why(tmp_path):
    """A 2000 x 2 strip is 4000 pixels, but resized to a 72 px shorter side it would be
    72 x 72000 = 5.2 million: above a limit of 10**6 both paths must refuse it, and with
    the limit one pixel above that both must read it."""
    strip = tmp_path / "strip.jpg"
    Image.new("RGB", (2000, 2), (200, 100, 50)).save(strip, quality=90)
    limit = 72 * 72000
    for max_pixels, ok in ((10**6, False), (limit - 1, False), (limit, True)):
        batch, out = decode_batch([str(strip)], "cpu", max_pixels=max_pixels)
        assert (len(batch["data"][0]) > 0, out["ok"].tolist()) == (ok, [ok]), max_pixels
        reference = ImageDataset([strip], eval_transform(MODEL_ARGS, uint8=True), image_shape=(3, 64, 64),
                                 max_pixels=max_pixels)[0]
        assert (reference["ok"], reference["error"]) == (ok, out["error"][0]), max_pixels
    assert "too elongated: 2000x2" in decode_batch([str(strip)], "cpu", max_pixels=10**6)[1]["error"][0]


def collection_rows(model, model_args, paths, rt, tta=1, workers=0, batch_size=5):
    """Every (ref, status, text, distribution) scored_rows gives over a collection_loader."""
    loader = collection_loader(as_sources(paths), model_args, rt, batch_size, workers, tta)
    return [row for rows in scored_rows(model, loader, rt) for row in rows]


@pytest.mark.parametrize("tta", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_device_decode_loader_scores_as_the_pillow_loader(jpegs, tta):
    paths = [jpegs[n] for n in DEVICE_NAMES + PILLOW_NAMES]
    model_args = dict(default_model_args("tiny_cnn"), image_size=64, resize_size=72)
    torch.manual_seed(0)
    model = build_model(model_args, pretrained="none").eval()
    rt = Runtime(torch.device("cpu"), channels_last=True, show_progress=False).for_model(model_args)
    device = collection_rows(model, model_args, paths, dataclasses.replace(rt, gpu_decode=True), tta, workers=1)
    pillow = collection_rows(model, model_args, paths, rt, tta)
    # One worker hands the items in the sources' order, batch by batch, as no worker does.
    assert [r[:6] for r in device] == [r[:6] for r in pillow] == [(p, 0, str(n), n) + r[4:6] for n, (p, r)
                                                                   in enumerate(zip(paths, pillow))]
    assert [r[4] for r in device] == ["ok"] * (len(DEVICE_NAMES) + 2) + ["error"] * 3
    assert [r[5] for r in device[-3:]] == ["truncated image", "zero-byte file", "file not found"]
    # Crops within one grey level of each other move a small random network's output little.
    ok = [n for n, r in enumerate(pillow) if r[4] == "ok"]
    assert np.abs(np.array([device[n][6] for n in ok]) - np.array([pillow[n][6] for n in ok])).max() < 1e-3


def test_device_decode_of_tar_members(jpegs, tmp_path):
    """Members of a tar shard reach the device decoder as the bytes read from the tar."""
    names = ["o1", "o6", "grey", "cmyk", "truncated"]
    write_tar(tmp_path / "s.tar", [(f"{n}.jpg", open(jpegs[n], "rb").read()) for n in names])
    pillow = pillow_decoder()
    items = list(JpegBytesDataset(resolve_specs([str(tmp_path / "s.tar")]), pillow))
    assert [i["key"] for i in items] == names
    assert [len(i["data"]) > 0 for i in items] == [True, True, True, False, False]
    out = DeviceJpegDecoder(pillow, MODEL_ARGS, "cpu")(default_collate(items))
    assert out["ok"].tolist() == [True, True, True, True, False] and out["error"][4] == "truncated image"
    ref = pillow_crops([jpegs[n] for n in names[:4]])
    assert max((out["image"][k].int() - ref[k].int()).abs().max().item() for k in range(3)) <= CPU_MAX_DIFF
    assert torch.equal(out["image"][3], ref[3])  # CMYK: Pillow's crop, in the worker


def test_device_decode_items_fall_to_one_rank_each(jpegs, tmp_path):
    """Under torchrun each process keeps its own share of the collection, as the Pillow
    path's dataset does: 2 ranks x 2 workers, every item in exactly one slot."""
    paths = [jpegs[n] for n in DEVICE_NAMES + PILLOW_NAMES]
    write_tar(tmp_path / "s.tar", [(f"m{n}.jpg", open(jpegs["o1"], "rb").read()) for n in range(6)])
    sources = as_sources(paths) + resolve_specs([str(tmp_path / "s.tar")])
    rt = Runtime(torch.device("cpu"), show_progress=False).for_model(MODEL_ARGS)
    refs = {}
    for rank in (0, 1):
        dataset = JpegBytesDataset(sources, pillow_decoder(), rank=rank, world_size=2)
        refs[rank] = [r for batch in make_loader(dataset, 4, 2, rt) for r in batch["ref"]]
    everything = paths + [f"{tmp_path / 's.tar'}:m{n}.jpg" for n in range(6)]
    assert sorted(refs[0] + refs[1]) == sorted(everything) and refs[0] and refs[1]


# ----- CUDA: skipped without a GPU -----

@pytest.mark.gpu
def test_cuda_uint8_path_equals_cpu_float_path():
    images = pil_images()
    expected = torch.stack([eval_transform(MODEL_ARGS)(img) for img in images])
    crops = torch.stack([eval_transform(MODEL_ARGS, uint8=True)(img) for img in images]).pin_memory()
    got = float_input(crops, "cuda", channels_last=True)
    assert got.device.type == "cuda" and got.is_contiguous(memory_format=torch.channels_last)
    diff = (got.cpu() - expected).abs().max().item()
    print(f"uint8 path on CUDA vs float path on CPU: max abs difference {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("tta", [1, 10])
def test_cuda_decode_crops_near_pillow_crops(jpegs, tta):
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's. The printed
    differences are the measurement; the bounds were set before any GPU run (mean under
    2 grey levels per crop, every crop under 40 at its worst pixel) and are to be
    replaced by the measured figures."""
    paths = [jpegs[n] for n in DEVICE_NAMES + PILLOW_NAMES]
    _, out = decode_batch(paths, "cuda", tta)
    assert out["image"].device.type == "cuda"
    assert out["ok"].tolist() == [True] * (len(DEVICE_NAMES) + 2) + [False] * 3
    refs = pillow_crops(paths[:len(DEVICE_NAMES) + 2], tta)
    diffs = [(got.cpu().float() - ref.float()).abs() for got, ref in zip(out["image"], refs)]
    means, maxes = [d.mean().item() for d in diffs], [d.max().item() for d in diffs]
    print(f"nvJPEG crops vs Pillow crops (tta={tta}), 0..255 units: mean abs {np.mean(means):.3f} "
          f"(worst file {max(means):.3f}), max abs {max(maxes):.0f}")
    assert max(means) < 2 and max(maxes) < 40


@pytest.mark.gpu
def test_cuda_device_decode_loader_runs_with_workers(jpegs):
    paths = [jpegs[n] for n in DEVICE_NAMES + PILLOW_NAMES] * 3
    model_args = dict(default_model_args("tiny_cnn"), image_size=64, resize_size=72)
    model = build_model(model_args, pretrained="none").cuda().eval()
    rt = Runtime(torch.device("cuda"), amp=True, channels_last=True, show_progress=False, gpu_decode=True)
    rows = collection_rows(model, model_args, paths, rt.for_model(model_args), workers=2, batch_size=8)
    assert sorted(r[3] for r in rows) == list(range(len(paths)))  # every item once, from two workers
    assert sum(r[4] == "error" for r in rows) == 9 and np.isfinite([r[6] for r in rows if r[4] == "ok"]).all()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""  # the suite's CPU pass hides the GPU


# ----- the CLIs' flags -----

@pytest.mark.slow
def test_cli_uint8_transfer_and_gpu_decode_match_the_float_path(demo_data, tmp_path):
    from conftest import run_main, run_test, tiny_train_args
    losses = {}
    for flag in ("off", "on"):
        ckpt = tmp_path / f"ckpt_{flag}"
        assert run_main(tiny_train_args(demo_data, ckpt, "--device", "cpu", "--epochs", "1", "--uint8_transfer", flag)) == 0
        row = (ckpt / "metrics.jsonl").read_text().splitlines()[0]
        losses[flag] = {k: v for k, v in json.loads(row).items() if k in ("train_loss", "val_emd")}
    assert losses["on"] == losses["off"]  # the same tensors reach the network, to the bit
    preds = {}
    for name, extra in (("float", ["--uint8_transfer", "off"]), ("uint8", ["--uint8_transfer", "on"]),
                        ("gpu_decode", ["--gpu_decode"])):
        out = tmp_path / f"pred_{name}"
        assert run_test(["--model", tmp_path / "ckpt_off" / "best.pth", "--test_csv", demo_data / "test_labels.csv",
                         "--test_images", demo_data / "images", "--predictions", out, "--workers", "1",
                         "--device", "cpu", "--quiet", *extra]) == 0
        preds[name] = np.loadtxt(out / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 13))
    assert np.array_equal(preds["uint8"], preds["float"])
    assert np.abs(preds["gpu_decode"] - preds["float"]).max() < 1e-3  # crops within a grey level
