"""Image bytes -> the network's input, in a pool of worker processes, exactly as test.py
decodes and transforms files (dataset.images.load_rgb, then the Scorer's transform); for
/explain and /enhance, the upright RGB photo itself, after the same checks.

Processes, not threads: load_rgb catches each image's decoder warnings with
warnings.catch_warnings, which changes interpreter-wide state and is not thread-safe;
and a decoder that crashes on a hostile file takes down one worker, not the service
(the pool is rebuilt and the image reported as unreadable).
"""
import asyncio
import io
import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from PIL import Image

from dataset.images import ImageReadError, check_resizable, load_rgb

log = logging.getLogger("nima.serve")
# The formats a request may send. Pillow opens many more, some through external
# programs (EPS through Ghostscript) or rarely exercised parsers: not for input from
# strangers. MPO is how older Pillows identify many phone cameras' JPEGs; Image.open
# refuses a name it does not know, so only the ones this Pillow has are kept.
Image.init()
ACCEPTED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)
SHOWN_FORMATS = tuple(f for f in ACCEPTED_FORMATS if f != "MPO")

_worker = {}


def _init_worker(transform, resize_size: int, max_pixels: int, draft_side=None) -> None:
    # The parent decides when the pool ends: Ctrl-C reaches the whole process group, and
    # some supervisors send SIGTERM to every process; the requests still being answered
    # during the graceful shutdown need their decoders.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # one image per worker at a time; the workers are the parallelism
    _worker.update(transform=transform, resize_size=resize_size, max_pixels=max_pixels, draft_side=draft_side)


def _ready() -> bool:
    return bool(_worker)


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
        text = str(exc)
        return None, ("image_too_large" if "max_image_pixels" in text else "unreadable_image"), text
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
    """`workers` decoding processes, rebuilt when one dies. draft_side: the Scorer's (a
    large JPEG decoded reduced, as test.py does; None: full size)."""

    def __init__(self, transform, resize_size: int, max_pixels: int, workers: int, draft_side=None):
        self._init_args = (transform, resize_size, max_pixels, draft_side)
        self.workers = workers
        self._pool = None

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: forking a process whose torch has started threads can deadlock the child.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=self._init_args)

    async def start(self) -> None:
        """Start every worker now (each imports torch: seconds), not on the first requests."""
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.workers)))

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def decode(self, data: bytes) -> tuple:
        """(input tensor, '', '') or (None, kind, reason), as decode_in_worker."""
        array, kind, reason = await self._run(decode_in_worker, data)
        return (torch.from_numpy(array) if array is not None else None), kind, reason

    async def decode_rgb(self, data: bytes, max_side: int) -> tuple:
        """(RGB PIL image at most max_side long, '', '') or (None, kind, reason), as
        decode_rgb_in_worker."""
        array, kind, reason = await self._run(decode_rgb_in_worker, data, max_side)
        return (Image.fromarray(array, "RGB") if array is not None else None), kind, reason

    async def _run(self, work, *args) -> tuple:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, work, *args)
            except BrokenProcessPool:
                # A worker died (a decoder crash, or killed for memory): every image then in the
                # pool fails with it. Rebuild once and try each again; an image that kills the
                # new pool as well is the culprit.
                if self._pool is pool:
                    log.error("a decoding process died; starting a new pool of %d", self.workers)
                    self._pool = self._new_pool()
                    pool.shutdown(wait=False)
        return None, "unreadable_image", "the decoder process crashed on this image"
