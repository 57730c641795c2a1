"""The HTTP scoring service: FastAPI routes over a Scorer, a decoding thread pool and
the dynamic batcher.

    POST /score    images (multipart fields `file`, or one raw image body) -> scores
    GET  /health   liveness, never touches the model
    GET  /model    the checkpoint, model_args, device, preprocessing and limits
    GET  /metrics  Prometheus text format
    GET  /docs     OpenAPI docs (FastAPI's)
"""
import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dataset.images import DEFAULT_MAX_PIXELS

from serving.batcher import BatcherStopped, DynamicBatcher
from serving.decoding import SHOWN_FORMATS, DecoderPool
from serving.errors import ServiceError
from serving.metrics import ServiceMetrics
from serving.uploads import FIELD, BodyReader, read_uploads

log = logging.getLogger("nima.serve")
ROUTES = ("/score", "/health", "/model", "/metrics", "/docs", "/openapi.json")


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

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


# Answer shapes, for the OpenAPI docs (the route builds the JSON itself).
class ImageScore(BaseModel):
    filename: Optional[str]
    mean: float
    std: float
    distribution: List[float]


class ImageError(BaseModel):
    filename: Optional[str]
    error: str


class ScoreAnswer(BaseModel):
    model: dict
    results: List[Union[ImageScore, ImageError]]


class ErrorAnswer(BaseModel):
    error: str
    detail: str


SCORE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [FIELD], "properties": {
        FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "one or more images (repeat the field)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "one image as the raw body"}}}}
ERROR_ANSWERS = {code: {"model": ErrorAnswer, "description": text} for code, text in (
    (400, "empty body, malformed multipart, no field named file"), (401, "missing or wrong API key"),
    (413, "body over --max_body_mb, or more than --max_files parts"), (415, "not multipart and not an image type"),
    (422, "the only image (or every image) could not be scored; the answer also lists them under results"),
    (503, "the service is shutting down"))}


class _CountRequests:
    """ASGI middleware: nima_http_requests{route, status} for every answer, including the
    ones FastAPI gives before a route runs (404, 405)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values

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
                                   config.workers)
        self._key = config.api_key.encode("utf-8") if config.api_key else None
        args = scorer.model_args
        self.summary = {"checkpoint": config.checkpoint, "base_model": args["base_model"]}

    async def start(self) -> None:
        await self.decoder.start()
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decoder.stop()

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
        return {"checkpoint": c.checkpoint, "model_args": args, "device": self.device, "bf16": self.scorer.rt.amp,
                "preprocessing": {"decode": "first frame, EXIF orientation applied, any mode to RGB "
                                            "(transparency on white, 16-bit scaled), as test.py",
                                  "resize_shorter_side": args["resize_size"], "crop": f"centre {args['image_size']}",
                                  "normalize": args["normalize"], "tta": self.scorer.tta},
                "batching": {"max_batch": c.max_batch, "max_wait_ms": c.max_wait_ms, "decode_processes": c.workers},
                "limits": {"max_body_mb": c.max_body_mb, "max_image_pixels": c.max_image_pixels,
                           "max_files": c.max_files, "formats": list(SHOWN_FORMATS)},
                "api_key_required": self._key is not None}

    async def _score_one(self, upload) -> tuple:
        """(result entry, error kind or '') for one upload."""
        if upload.error_kind:
            return {"filename": upload.filename, "error": upload.error}, upload.error_kind
        tensor, kind, reason = await self.decoder.decode(upload.data)
        if tensor is None:
            return {"filename": upload.filename, "error": reason}, kind
        try:
            s = await self.batcher.submit(tensor)
        except BatcherStopped as exc:
            raise ServiceError(503, "shutting_down", f"{exc}; retry on another replica") from None
        return {"filename": upload.filename, "mean": s.mean, "std": s.std, "distribution": s.distribution}, ""

    async def score(self, request: Request) -> dict:
        body = BodyReader(request, self.config.max_body_bytes, f"--max_body_mb {self.config.max_body_mb:g}")
        try:
            self.check_key(request)
            uploads = await read_uploads(request, body, self.config.max_files)
        except ServiceError:
            await body.discard_rest()
            raise
        pairs = await asyncio.gather(*(self._score_one(u) for u in uploads))
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

    app = FastAPI(title="NIMA scoring service", lifespan=lifespan,
                  description="Aesthetic score distributions (ratings 1..10) of photos, from a NIMA checkpoint.")
    app.state.service = service
    app.add_middleware(_CountRequests, metrics=service.metrics)

    @app.exception_handler(ServiceError)
    async def service_error(_request, exc: ServiceError):
        if exc.count:
            service.metrics.errors.labels(exc.kind).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = (f"{request.method} {request.url.path}: {exc.detail}; the routes are POST /score, GET /health, "
                  "GET /model, GET /metrics, GET /docs")
        service.metrics.errors.labels(kind).inc()
        return JSONResponse({"error": kind, "detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        service.metrics.errors.labels("internal_error").inc()
        return JSONResponse({"error": "internal_error", "detail": f"{type(exc).__name__}: {exc} (see the server log)"},
                            status_code=500)

    @app.get("/health", summary="Liveness: answers without touching the model or needing the API key")
    async def health():
        return {"status": "ok"}

    @app.get("/model", summary="The checkpoint, model_args, device, preprocessing and limits",
             responses={401: ERROR_ANSWERS[401]})
    async def model(request: Request):
        service.check_key(request)
        return service.model_info()

    @app.get("/metrics", summary="Prometheus metrics (text format)", responses={401: ERROR_ANSWERS[401]})
    async def metrics(request: Request):
        service.check_key(request)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/score", summary="Score one or more images", openapi_extra=SCORE_BODY,
              responses={200: {"model": ScoreAnswer, "description": "results in request order"}, **ERROR_ANSWERS})
    async def score(request: Request):
        service.metrics.in_progress.inc()
        started = time.perf_counter()
        try:
            return await service.score(request)
        except ClientDisconnect:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        finally:
            service.metrics.in_progress.dec()
            service.metrics.latency.observe(time.perf_counter() - started)

    return app
