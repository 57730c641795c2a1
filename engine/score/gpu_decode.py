"""Decode JPEGs on the device (test.py --gpu_decode): the collection's loader workers
(engine/score/collection.py) only read the images' bytes and their headers, and the main
process decodes each batch at once with
`torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA), then applies the EXIF
orientation, resizes the shorter side (bilinear, antialiased) and crops there.

The crops are those of the Pillow path (load_rgb + eval_transform / TTACrops) up to
the two decoders' differences: the same output size, the same crop offsets, the same
orientation. Every file the device path does not take goes through the Pillow path
instead, in the worker: other formats, CMYK and other JPEG modes, JPEGs that do not
end with their end-of-image marker (Pillow reports those as truncated), headers that
warn or fail, images above the pixel limit or too elongated to resize under it. A file
the device decoder rejects is read by the Pillow path in the main process, from the
bytes already read. Reasons for unreadable files are Pillow's.

With device='cpu' the same code decodes with libjpeg-turbo through torchvision, which
is how it is tested without a GPU.
"""
import io
import warnings

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from dataset import ImageDataset
from dataset.decode_limits import decode_cost_problem
from dataset.images import ImageReadError, check_resizable
from dataset.stream import CollectionDataset
from dataset.transforms import tta_crops, uint8_to_input

from engine.loaders import make_loader

EXIF_ORIENTATION = 0x0112
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def jpeg_header(data: bytes, max_pixels: int):
    """(EXIF orientation 1..8, (height, width) as stored) when `data` is a whole RGB or
    greyscale JPEG the device decoder can take; None when the Pillow path should
    read it."""
    # A file cut short lacks its end marker; Pillow refuses it as truncated, and so must
    # this path (nvJPEG may decode the part that is there). Trailing zero padding is kept
    # by some writers after the marker.
    if len(data) < 4 or not data.startswith(JPEG_START) or not data.rstrip(b"\0").endswith(JPEG_END):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a header Pillow warns about: its path reports the warning
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None  # MPO, CMYK, YCCK, ...: Pillow converts those its own way
                if decode_cost_problem(img, data=data):
                    return None  # too many scans, too much memory: the Pillow path refuses it, saying why
                width, height = img.size
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - anything odd goes to the Pillow path, which names the reason
            return None
    if width < 1 or height < 1 or width * height > max_pixels or not isinstance(orientation, int):
        return None
    # ImageOps.exif_transpose leaves an image with any other value as stored.
    return (orientation if 1 <= orientation <= 8 else 1), (height, width)


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(..., H, W) as Pillow's exif_transpose turns a stored image upright (views, no copy)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))  # Pillow's ROTATE_270: a quarter turn clockwise
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


class JpegBytesDataset(CollectionDataset):
    """A collection (dataset/stream.py) whose loader workers hand the main process the
    bytes of every JPEG the device can decode, with the header fields it needs. Items
    are CollectionDataset's plus `data` (the image's bytes, b'' where the Pillow path
    made `image`), `orientation`, `height`, `width` (as stored); for items with data,
    `image` is a blank to be replaced. `decoder`: the Pillow path's ImageDataset, with
    uint8 crops."""

    def item(self, source: int, entry) -> dict:
        data = None
        if not entry.error:
            try:
                data = entry.data if isinstance(entry.data, bytes) else read_bytes(entry.data)
            except OSError:
                pass  # missing, unreadable: the Pillow path gives the reason
        header = jpeg_header(data, self.decoder.max_pixels) if data is not None else None
        if header is not None and not self.resizable(header[1]):
            header = None  # the Pillow path names the problem (too elongated)
        if header is None:
            item = super().item(source, entry if data is None else entry._replace(data=data))  # the bytes read once
            item.update(data=b"", orientation=1, height=0, width=0)
            return item
        orientation, (height, width) = header
        return {"ref": entry.ref, "source": source, "key": entry.key, "order": entry.order,
                "image": self.decoder.blank(), "ok": True, "error": "", "warning": "",
                "data": data, "orientation": orientation, "height": height, "width": width}

    def resizable(self, size) -> bool:
        try:
            check_resizable(size, self.decoder.resize_to, self.decoder.max_pixels)
        except ImageReadError:
            return False
        return True


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class DeviceJpegDecoder:
    """Turns a collated JpegBytesDataset batch into uint8 crops on `device`. `pillow`:
    the ImageDataset that decodes what the device decoder refuses, from the same bytes."""

    def __init__(self, pillow: ImageDataset, model_args: dict, device, tta: int = 1):
        self.pillow, self.device, self.tta = pillow, torch.device(device), tta
        self.resize_size, self.size = model_args["resize_size"], model_args["image_size"]

    def decode(self, datas: list) -> list:
        """Decoded (3, H, W) uint8 tensors on the device, None where the decoder refused."""
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # one bad file fails the whole batch: find it one by one
        out = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def crops_of(self, images: torch.Tensor) -> torch.Tensor:
        """(G, 3, H, W) upright images of one size -> (G, 3, S, S) or (G, tta, 3, S, S)."""
        images = F.resize(images, [self.resize_size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if self.tta == 1:
            return F.center_crop(images, [self.size, self.size])
        return torch.stack(tta_crops(images, self.size, self.tta), dim=1)

    def __call__(self, batch: dict) -> dict:
        """The batch with `image` the uint8 crops on the device and the device fields
        dropped; `ok` and `error` updated for files that no path could read."""
        image = batch["image"].to(self.device, non_blocking=True)  # the Pillow path's crops, blanks elsewhere
        ok, error = batch["ok"].clone(), list(batch["error"])
        jobs = [k for k, d in enumerate(batch["data"]) if d]
        groups, refused = {}, []
        if jobs:
            decoded = self.decode([batch["data"][k] for k in jobs])
            for k, img in zip(jobs, decoded):
                stored = (int(batch["height"][k]), int(batch["width"][k]))
                if img is None or tuple(img.shape[-2:]) != stored:
                    refused.append(k)
                    continue
                img = apply_orientation(img, int(batch["orientation"][k]))
                groups.setdefault(tuple(img.shape), []).append((k, img))
        # Images of one size are resized and cropped together (the resize cache gives many).
        for members in groups.values():
            crops = self.crops_of(torch.stack([img for _, img in members]))
            for j, (k, _) in enumerate(members):
                image[k] = crops[j]  # integer indices: a tensor index would cost a host-to-device copy
        for k in refused:  # read by Pillow here, in the main process
            crop, ok[k], error[k], warning = self.pillow.decode(io.BytesIO(batch["data"][k]))
            image[k] = crop.to(self.device)
            if warning:
                batch["warning"][k] = warning
        out = {key: value for key, value in batch.items() if key not in ("data", "orientation", "height", "width")}
        out.update(image=image, ok=ok, error=error)
        return out


class DeviceDecodeLoader:
    """Iterates a DataLoader over a JpegBytesDataset and yields its batches decoded,
    cropped and normalised on the device: `image` is the network's float32 input
    (channels_last when the runtime says so), which Runtime.images_to_device passes
    on unchanged."""

    def __init__(self, loader, decoder: DeviceJpegDecoder, normalize: str, channels_last: bool = False):
        self.loader, self.decoder, self.normalize, self.channels_last = loader, decoder, normalize, channels_last

    def __iter__(self):
        for batch in self.loader:
            batch = self.decoder(batch)
            images = batch["image"]
            if images.dim() == 5:  # TTA: batch_distributions flattens (B, N, ...) itself; keep the shape
                batch["image"] = uint8_to_input(images, self.normalize)
            else:
                batch["image"] = uint8_to_input(images, self.normalize, self.channels_last)
            yield batch


def device_decode_loader(sources, pillow, model_args, rt, batch_size, workers, tta=1, done=frozenset()):
    """The --gpu_decode loader of a collection: the batches, items and order of
    make_loader(CollectionDataset(sources, pillow, ...)), images decoded on rt.device.
    `pillow`: the Pillow path's ImageDataset (uint8 crops); `done`: refs to skip."""
    dataset = JpegBytesDataset(sources, pillow, rt.dist.rank, rt.dist.world_size, done)
    decoder = DeviceJpegDecoder(pillow, model_args, rt.device, tta)
    return DeviceDecodeLoader(make_loader(dataset, batch_size, workers, rt), decoder, model_args["normalize"],
                              rt.channels_last)
