"""The HTTP scoring service: FastAPI routes over a Scorer, a pool of decoding
processes and the dynamic batcher.

    POST /score    images (multipart fields `file`, or one raw image body) -> scores
    POST /explain  the same uploads -> heat maps (serving/explain.py)
    POST /enhance  the same uploads -> enhanced photos and a parameter sweep
    GET  /health   liveness, never touches the model (HEAD too, for load balancers)
    GET  /model    the checkpoint, its model card (with `toy` and `warning`), model_args, device,
                   preprocessing and limits
    GET  /metrics  Prometheus text format
    GET  /docs     OpenAPI docs (FastAPI's Swagger UI, its assets served from here)
    GET  /         the web page (serving/pages.py, serving/static/)

Connections (timeouts, their limit) are guarded below the app, in serving.connections;
the bytes of uploads in flight by serving.limits.
"""
import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dataset.decode_limits import DecodeLimits
from dataset.images import DEFAULT_MAX_PIXELS

from serving.batcher import BatcherStopped, DynamicBatcher
from serving.decoding import SHOWN_FORMATS, DecoderPool
from serving.errors import ServiceError
from serving.explain import enhance_one, enhance_options, explain_one, explain_options
from serving.limits import MIB, Reservation, UploadBudget
from serving.memory import Trimmer
from serving.metrics import ServiceMetrics
from serving.middleware import NoSniff
from serving.openapi import (ENHANCE_PARAMETERS, ERROR_ANSWERS, EXPLAIN_PARAMETERS, KEY_SCHEMES, SCORE_BODY, EnhanceAnswer,
                             ExplainAnswer, ScoreAnswer)
from serving.pages import STATIC_PREFIX, add_pages
from serving.uploads import BodyReader, read_uploads

log = logging.getLogger("nima.serve")
ROUTES = ("/score", "/explain", "/enhance", "/health", "/model", "/metrics", "/docs", "/openapi.json", "/",
          "/favicon.ico")


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


class _CountRequests:
    """ASGI middleware: nima_http_requests{route, status} for every answer, including the
    ones FastAPI gives before a route runs (404, 405)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]  # bounded label values:
        route = path if path in ROUTES else STATIC_PREFIX if path.startswith(STATIC_PREFIX + "/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


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


def create_app(scorer, config: ServeConfig, device: str) -> FastAPI:
    service = ScoringService(scorer, config, device)

    @asynccontextmanager
    async def lifespan(_app):
        await service.start()
        try:
            yield
        finally:
            # uvicorn has answered every accepted request by now (graceful shutdown).
            await service.stop()

    # FastAPIOffline: FastAPI whose /docs and /redoc load their scripts from this service
    # (fastapi-offline ships them), not from a CDN, so the docs work without internet.
    # No /redoc (one documentation page is enough); no redirect from /model/ to /model,
    # whose Location would be built from the request's Host header.
    app = FastAPIOffline(title="NIMA scoring service", lifespan=lifespan, static_url="/docs-assets",
                         favicon_url="/favicon.ico", redoc_url=None,
                         description="Aesthetic score distributions (ratings 1..10) of photos, from a NIMA checkpoint. "
                                     "The web page is at /.")
    app.router.redirect_slashes = False
    app.state.service = service
    app.add_middleware(_CountRequests, metrics=service.metrics)
    app.add_middleware(NoSniff)

    @app.exception_handler(ServiceError)
    async def service_error(_request, exc: ServiceError):
        if exc.count:
            service.metrics.errors.labels(exc.kind).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = (f"{request.method} {request.url.path}: {exc.detail}; the routes are POST /score, POST /explain, "
                  "POST /enhance, GET /health, GET /model, GET /metrics, GET /docs, GET / (the web page)")
        service.metrics.errors.labels(kind).inc()
        return JSONResponse({"error": kind, "detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        service.metrics.errors.labels("internal_error").inc()
        return JSONResponse({"error": "internal_error", "detail": f"{type(exc).__name__}: {exc} (see the server log)"},
                            status_code=500, headers={"X-Content-Type-Options": "nosniff"})

    @app.api_route("/health", methods=["GET", "HEAD"],
                   summary="Liveness: answers without touching the model or needing the API key")
    async def health():
        return {"status": "ok"}

    @app.get("/model", summary="The checkpoint, its model card, model_args, device, preprocessing and limits",
             responses={401: ERROR_ANSWERS[401]}, dependencies=KEY_SCHEMES)
    async def model(request: Request):
        service.check_key(request)
        return service.model_info()

    @app.get("/metrics", summary="Prometheus metrics (text format)", responses={401: ERROR_ANSWERS[401]},
             dependencies=KEY_SCHEMES)
    async def metrics(request: Request):
        service.check_key(request)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/score", summary="Score one or more images", openapi_extra=SCORE_BODY, dependencies=KEY_SCHEMES,
              responses={200: {"model": ScoreAnswer, "description": "results in request order"}, **ERROR_ANSWERS})
    async def score(request: Request):
        service.metrics.in_progress.inc()
        started = time.perf_counter()
        try:
            async with service.in_progress():
                return await service.score(request)
        except ClientDisconnect:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        finally:
            service.metrics.in_progress.dec()
            service.metrics.latency.observe(time.perf_counter() - started)

    @app.post("/explain", summary="Heat maps: where each image raises (red) or lowers (blue) its predicted mean",
              openapi_extra={**SCORE_BODY, "parameters": EXPLAIN_PARAMETERS}, dependencies=KEY_SCHEMES,
              responses={200: {"model": ExplainAnswer, "description": "results in request order"}, **ERROR_ANSWERS})
    async def explain(request: Request):
        try:
            async with service.in_progress():
                return await service.handle(request, partial(explain_one, service), explain_options)
        except ClientDisconnect:
            return Response(status_code=499)

    @app.post("/enhance", summary="The global enhancement that raises each image's predicted mean, and a sweep",
              openapi_extra={**SCORE_BODY, "parameters": ENHANCE_PARAMETERS}, dependencies=KEY_SCHEMES,
              responses={200: {"model": EnhanceAnswer, "description": "results in request order"}, **ERROR_ANSWERS})
    async def enhance(request: Request):
        try:
            async with service.in_progress():
                return await service.handle(request, partial(enhance_one, service), enhance_options)
        except ClientDisconnect:
            return Response(status_code=499)

    add_pages(app)
    return app
