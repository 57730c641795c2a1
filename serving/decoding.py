"""Image bytes -> the network's input, in a pool of worker processes, exactly as test.py
decodes and transforms files (dataset.images.load_rgb, then the Scorer's transform); for
/explain and /enhance, the upright RGB photo itself, after the same checks.

Processes, not threads: load_rgb catches each image's decoder warnings with
warnings.catch_warnings, which changes interpreter-wide state and is not thread-safe;
a decoder that crashes on a hostile file takes down one worker, not the service (the
worker is replaced and the image reported as unreadable); and a decode that overruns
--decode_timeout is stopped by its own deadline, or by killing its process
(serving.workers). Requests take turns at the decoders, one image each.
"""
import io
import logging

import numpy as np
import torch
from PIL import Image

from dataset.decode_limits import DecodeLimits, set_decode_limits
from dataset.images import ImageReadError, check_resizable, load_rgb

from serving.memory import return_freed_memory
from serving.errors import ServiceError
from serving.workers import FairProcessPool, JobTimeout, PoolStopped, WorkerDied

log = logging.getLogger("nima.serve")
# The formats a request may send. Pillow opens many more, some through external
# programs (EPS through Ghostscript) or rarely exercised parsers: not for input from
# strangers. MPO is how older Pillows identify many phone cameras' JPEGs; Image.open
# refuses a name it does not know, so only the ones this Pillow has are kept.
Image.init()
ACCEPTED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)
SHOWN_FORMATS = tuple(f for f in ACCEPTED_FORMATS if f != "MPO")

_worker = {}


def _init_worker(transform, resize_size: int, max_pixels: int, limits: DecodeLimits, draft_side=None) -> None:
    torch.set_num_threads(1)  # one image per worker at a time; the workers are the parallelism
    return_freed_memory()  # a large image's buffers go back to the system once it is decoded
    set_decode_limits(limits.timeout_s, limits.max_decode_mb)
    _worker.update(transform=transform, resize_size=resize_size, max_pixels=max_pixels, draft_side=draft_side)


def error_kind(reason: str) -> str:
    """The JSON error kind of an unreadable image's reason (dataset.images' texts)."""
    if "--max_image_pixels" in reason or "--max_decode_mb" in reason:
        return "image_too_large"
    if "--decode_timeout" in reason:
        return "decode_timeout"
    if "too many scans" in reason:
        return "image_too_complex"
    return "unreadable_image"


def _read_checked(data: bytes, draft_side=None) -> tuple:
    """(upright RGB image, '', '') or (None, error kind, reason): the format, pixel and
    resize checks every route applies before using an upload; `draft_side`: a large JPEG
    decoded reduced (dataset.images.draft), for scoring."""
    if not data:
        return None, "unreadable_image", "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS):
            pass
    except Image.UnidentifiedImageError:
        return None, "not_an_image", f"not an image in an accepted format ({', '.join(SHOWN_FORMATS)})"
    except Exception:  # noqa: BLE001 - an accepted format failing early: load_rgb names the reason below
        pass
    limit = _worker["max_pixels"]
    try:
        rgb = load_rgb(io.BytesIO(data), max_pixels=limit, draft_side=draft_side)
        check_resizable(rgb.size, _worker["resize_size"], limit)  # before the resize allocates it
    except ImageReadError as exc:
        return None, error_kind(str(exc)), str(exc)
    return rgb, "", ""


def decode_in_worker(data: bytes) -> tuple:
    """(input as a numpy array, '', '') or (None, error kind, reason). Errors are returned,
    not raised, so that nothing but plain values crosses the process boundary."""
    rgb, kind, reason = _read_checked(data, _worker["draft_side"])
    if rgb is None:
        return None, kind, reason
    try:
        return _worker["transform"](rgb).numpy(), "", ""
    except Exception as exc:  # noqa: BLE001 - the transforms on an odd image: that image's error
        return None, "unreadable_image", f"cannot transform: {type(exc).__name__}: {exc}"[:200]


def decode_rgb_in_worker(data: bytes, max_side: int) -> tuple:
    """(upright RGB pixels as a (height, width, 3) uint8 array, '', '') or (None, error
    kind, reason), after the same checks as decode_in_worker; a photo longer than
    `max_side` on its longer side is reduced to it here (the explanations' working size),
    so that only that much crosses the process boundary. Decoded at full size: /enhance
    returns the photo at that working size, which a draft could make smaller."""
    rgb, kind, reason = _read_checked(data)
    if rgb is None:
        return None, kind, reason
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8), "", ""


class DecoderPool:
    """`workers` decoding processes (serving.workers.FairProcessPool). draft_side: the
    Scorer's (a large JPEG decoded reduced, as test.py does; None: full size)."""

    def __init__(self, transform, resize_size: int, max_pixels: int, workers: int, limits: DecodeLimits,
                 on_replace=None, draft_side=None):
        self.limits = limits
        self.workers = workers
        self._pool = FairProcessPool(workers, limits.timeout_s, initializer=_init_worker,
                                     initargs=(transform, resize_size, max_pixels, limits, draft_side), preload=[__name__],
                                     on_replace=on_replace)

    @property
    def queued(self) -> int:
        return self._pool.queued

    def pids(self) -> list:
        return self._pool.pids()

    async def start(self) -> None:
        """Start every worker now (not on the first requests)."""
        await self._pool.start()

    async def stop(self) -> None:
        await self._pool.stop()

    async def decode(self, data: bytes, owner=None) -> tuple:
        """(input tensor, '', '') or (None, kind, reason), as decode_in_worker. `owner`
        (the request): its images wait their turn behind one image of each other request."""
        array, kind, reason = await self._run(owner, decode_in_worker, data)
        return (torch.from_numpy(array) if array is not None else None), kind, reason

    async def decode_rgb(self, data: bytes, max_side: int, owner=None) -> tuple:
        """(RGB PIL image at most max_side long, '', '') or (None, kind, reason), as
        decode_rgb_in_worker."""
        array, kind, reason = await self._run(owner, decode_rgb_in_worker, data, max_side)
        return (Image.fromarray(array, "RGB") if array is not None else None), kind, reason

    async def _run(self, owner, work, data: bytes, *args) -> tuple:
        try:
            return await self._pool.run(owner, work, data, *args)
        except PoolStopped as exc:
            raise ServiceError(503, "shutting_down", f"{exc}; retry on another replica") from None
        except JobTimeout:
            return None, "decode_timeout", (f"decode took longer than --decode_timeout {self.limits.timeout_s:g} s "
                                            "(its decoding process was replaced)")
        except WorkerDied:
            return None, "unreadable_image", "the decoder process crashed on this image"
