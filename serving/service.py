"""The state and the request path the service's routes share (serving/app.py): the
configuration, the scorer, the decoding processes, the dynamic batcher, the upload budget,
the API key check, and handle(), the one path every image route takes (key, options,
uploads within the limits, each image decoded and run, answers in request order)."""
import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Optional

from fastapi import Request

from dataset.decode_limits import DecodeLimits
from dataset.images import DEFAULT_MAX_PIXELS

from serving.batcher import BatcherStopped, DynamicBatcher
from serving.decoding import SHOWN_FORMATS, DecoderPool
from serving.errors import ServiceError
from serving.limits import MIB, Reservation, UploadBudget
from serving.memory import Trimmer
from serving.metrics import ServiceMetrics
from serving.uploads import BodyReader, read_uploads


@dataclass
class ServeConfig:
    checkpoint: str             # the checkpoint's file name (never its full path: answers go to strangers)
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_body_mb: float = 20.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64
    workers: int = 2
    api_key: Optional[str] = None
    decode: DecodeLimits = DecodeLimits()   # --decode_timeout, --max_decode_mb
    max_inflight_mb: float = 128.0          # upload bytes being received or decoded, all requests together
    queue_timeout: float = 10.0             # longest wait for that budget before a 503

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ScoringService:
    """What the routes share: the scorer, the pools, the batcher, the metrics."""

    def __init__(self, scorer, config: ServeConfig, device: str):
        self.scorer, self.config, self.device = scorer, config, device
        self.metrics = ServiceMetrics(config.max_batch)
        self.batcher = DynamicBatcher(scorer.score_tensors, config.max_batch, config.max_wait_ms / 1000.0,
                                      on_batch=self.metrics.observe_batch)
        self.decoder = DecoderPool(scorer.transform, scorer.model_args["resize_size"], config.max_image_pixels,
                                   config.workers, config.decode, on_replace=self.metrics.decoders_replaced.inc,
                                   draft_side=scorer.draft_side)
        self.uploads = UploadBudget(int(config.max_inflight_mb * MIB), config.queue_timeout)
        self.metrics.decode_queue.set_function(lambda: self.decoder.queued)
        self.metrics.upload_bytes.set_function(lambda: self.uploads.used)
        self.trimmer = Trimmer()  # the memory of a burst of uploads goes back to the system once it is over
        self.cut = 0              # requests cut by the graceful shutdown's timeout
        self._key = config.api_key.encode("utf-8") if config.api_key else None
        args = scorer.model_args
        self.summary = {"checkpoint": config.checkpoint, "base_model": args["base_model"]}

    async def start(self) -> None:
        await self.decoder.start()
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.decoder.stop()

    def check_key(self, request: Request) -> None:
        """401 unless the request carries the API key (when one is set), compared in
        constant time so that response timing does not reveal how much of a guess matched."""
        if self._key is None:
            return
        offered = []
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer":
                offered.append(token.strip())
        if request.headers.get("x-api-key") is not None:
            offered.append(request.headers["x-api-key"])
        challenge = {"WWW-Authenticate": 'Bearer realm="nima"'}
        if not offered:
            raise ServiceError(401, "unauthorized", "missing API key: send 'Authorization: Bearer KEY' or "
                               "'X-API-Key: KEY' (the key the server was started with)", headers=challenge)
        # Every offered key is compared, matched or not, so the work does not depend on which one matched.
        matches = [hmac.compare_digest(token.encode("latin-1"), self._key) for token in offered]
        if not any(matches):
            raise ServiceError(401, "unauthorized", "wrong API key (sent as 'Authorization: Bearer' or "
                               "'X-API-Key'); use the key the server was started with", headers=challenge)

    def model_info(self) -> dict:
        args, c = self.scorer.model_args, self.config
        return {"checkpoint": c.checkpoint, "card": self.scorer.card, "model_args": args, "device": self.device,
                "bf16": self.scorer.rt.amp,
                "preprocessing": {"decode": "first frame, EXIF orientation applied, any mode to RGB "
                                            "(transparency on white, 16-bit scaled), as test.py",
                                  "resize_shorter_side": args["resize_size"], "crop": f"centre {args['image_size']}",
                                  "normalize": args["normalize"], "tta": self.scorer.tta},
                "batching": {"max_batch": c.max_batch, "max_wait_ms": c.max_wait_ms, "decode_processes": c.workers},
                "limits": {"max_body_mb": c.max_body_mb, "max_image_pixels": c.max_image_pixels,
                           "max_files": c.max_files, "formats": list(SHOWN_FORMATS),
                           "decode_timeout": c.decode.timeout_s, "max_decode_mb": c.decode.max_decode_mb,
                           "max_inflight_mb": c.max_inflight_mb},
                "api_key_required": self._key is not None}

    async def _score_one(self, upload) -> tuple:
        """(result entry, error kind or '') for one upload. Its request's images take
        turns with other requests' at the decoders and in the batches (upload.owner)."""
        if upload.error_kind:
            return {"filename": upload.filename, "error": upload.error}, upload.error_kind
        tensor, kind, reason = await self.decoder.decode(upload.data, upload.owner)
        upload.data = None  # decoded: the bytes can go
        if tensor is None:
            return {"filename": upload.filename, "error": reason}, kind
        try:
            s = await self.batcher.submit(tensor, upload.owner)
        except BatcherStopped as exc:
            raise ServiceError(503, "shutting_down", f"{exc}; retry on another replica") from None
        return {"filename": upload.filename, "mean": s.mean, "std": s.std, "distribution": s.distribution,
                "percentile": s.percentile}, ""

    async def read_photo(self, upload, max_side: int) -> tuple:
        """(upright RGB image at most max_side long, '', '') or (None, error kind, reason),
        after the same checks as /score's decoding."""
        if upload.error_kind:
            return None, upload.error_kind, upload.error
        photo = await self.decoder.decode_rgb(upload.data, max_side, upload.owner)
        upload.data = None  # decoded: the bytes can go
        return photo

    async def on_model(self, work, *args):
        """work(*args) on the model thread, in turn with the batches (DynamicBatcher.run_alone)."""
        try:
            return await self.batcher.run_alone(work, *args)
        except BatcherStopped as exc:
            raise ServiceError(503, "shutting_down", f"{exc}; retry on another replica") from None

    async def score(self, request: Request) -> dict:
        return await self.handle(request, self._score_one)

    async def handle(self, request: Request, one, options=None) -> dict:
        """The path every image route takes: the API key, the query's options (options(query)
        -> dict, or ServiceError 400), the uploads within the limits, then one(upload[,
        options]) -> (entry, error kind or '') for each, concurrently, answered in request
        order; 422 when no image could be done. The request's upload bytes count against
        --max_inflight_mb until its images are decoded."""
        reservation = Reservation(self.uploads, f"--max_inflight_mb {self.config.max_inflight_mb:g}")
        try:
            return await self._handle(request, one, options, reservation)
        finally:
            reservation.release()

    async def _handle(self, request: Request, one, options, reservation: Reservation) -> dict:
        body = BodyReader(request, self.config.max_body_bytes, f"--max_body_mb {self.config.max_body_mb:g}",
                          reservation)
        try:
            self.check_key(request)
            if options is not None:
                one = partial(one, options=options(request.query_params))
            uploads = await read_uploads(request, body, self.config.max_files)
        except ServiceError:
            await body.discard_rest()
            raise
        owner = object()  # the request, whose images take their turns together
        for upload in uploads:
            upload.owner = owner
        pairs = await asyncio.gather(*(one(u) for u in uploads))
        results = [entry for entry, _ in pairs]
        kinds = [kind for _, kind in pairs if kind]
        for kind in kinds:
            self.metrics.errors.labels(kind).inc()
        self.metrics.images.labels("scored").inc(len(pairs) - len(kinds))
        if kinds:
            self.metrics.images.labels("error").inc(len(kinds))
        if len(kinds) == len(pairs):
            # Nothing scored: an error for the request, still listing each image's reason.
            detail = results[0]["error"] if len(results) == 1 else f"none of the {len(results)} images could be scored"
            raise ServiceError(422, kinds[0] if len(set(kinds)) == 1 else "unreadable_image", detail,
                               extra={"results": results}, count=False)
        return {"model": self.summary, "results": results}

    @asynccontextmanager
    async def in_progress(self):
        """Around an image route: the memory trim once the service is idle, and the count
        of requests cut by the graceful shutdown's timeout."""
        self.trimmer.started()
        try:
            yield
        except asyncio.CancelledError:
            self.cut += 1  # still in progress when --shutdown_timeout ran out
            raise
        finally:
            self.trimmer.finished(asyncio.get_running_loop())
