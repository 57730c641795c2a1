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
import logging
import time
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving.errors import ServiceError
from serving.explain import enhance_one, enhance_options, explain_one, explain_options
from serving.metrics import ServiceMetrics
from serving.middleware import NoSniff
from serving.openapi import (ENHANCE_PARAMETERS, ERROR_ANSWERS, EXPLAIN_PARAMETERS, KEY_SCHEMES, SCORE_BODY, EnhanceAnswer,
                             ExplainAnswer, ScoreAnswer)
from serving.pages import STATIC_PREFIX, add_pages
from serving.service import ScoringService, ServeConfig

log = logging.getLogger("nima.serve")
ROUTES = ("/score", "/explain", "/enhance", "/health", "/model", "/metrics", "/docs", "/openapi.json", "/",
          "/favicon.ico")


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
