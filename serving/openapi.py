"""What the OpenAPI docs (/docs, /openapi.json) show beyond what FastAPI finds itself:
the answers' shapes (the routes build their JSON themselves), the upload body, the
error answers, the query parameters of /explain and /enhance, and the API key schemes."""
from typing import Dict, List, Optional, Union

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel

from engine.explain.enhance import PARAMS
from engine.explain.heatmaps import METHODS

from serving.explain import DEFAULT_SWEEP, LR, STEPS, SWEEP_STEPS
from serving.uploads import FIELD

# For the docs only (the check is ScoringService.check_key): so that Swagger UI's
# "Authorize" sends the key with "Try it out". Either header will do.
KEY_SCHEMES = [Security(APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="X-API-Key",
                                     description="the key serve.py was started with (--api_key or $NIMA_API_KEY)")),
               Security(HTTPBearer(auto_error=False, scheme_name="Bearer",
                                   description="the same key as 'Authorization: Bearer KEY'"))]


# The answers' shapes (each route builds its JSON itself).
class ImageScore(BaseModel):
    filename: Optional[str]
    mean: float
    std: float
    distribution: List[float]
    percentile: Optional[float]  # share (0..100) of the model's validation images it scored lower; null without


class ImageError(BaseModel):
    filename: Optional[str]
    error: str


class ScoreAnswer(BaseModel):
    model: dict
    results: List[Union[ImageScore, ImageError]]


class ExplainResult(BaseModel):
    filename: Optional[str]
    width: int
    height: int
    mean: float
    std: float
    distribution: List[float]
    method: str
    layer: str
    crop_box: List[float]
    heatmap: str


class SweepResult(BaseModel):
    param: str
    values: List[float]
    scores: List[float]
    images: List[str]


class EnhanceResult(BaseModel):
    filename: Optional[str]
    width: int
    height: int
    score_before: float
    score_after: float
    raised: bool
    note: str
    params: Dict[str, float]
    found: Dict[str, float]
    bounds: Dict[str, Dict[str, float]]
    steps: int
    lr: float
    best_step: int
    history: List[float]
    image: str
    sweep: Optional[SweepResult]


class ExplainAnswer(BaseModel):
    model: dict
    results: List[Union[ExplainResult, ImageError]]


class EnhanceAnswer(BaseModel):
    model: dict
    results: List[Union[EnhanceResult, ImageError]]


class ErrorAnswer(BaseModel):
    error: str
    detail: str


SCORE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [FIELD], "properties": {
        FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "one or more images (repeat the field)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "one image as the raw body"}}}}
ERROR_ANSWERS = {code: {"model": ErrorAnswer, "description": text} for code, text in (
    (400, "empty body, malformed multipart, no field named file; a bad query parameter (/explain, /enhance)"),
    (401, "missing or wrong API key"),
    (413, "body over --max_body_mb, or more than --max_files parts"), (415, "not multipart and not an image type"),
    (408, "the request's header or body came too slowly (the connection is closed)"),
    (422, "the only image (or every image) could not be scored; the answer also lists them under results"),
    (503, "busy: every connection has a request in progress, or the upload bytes in flight are at their limit "
          "(both with Retry-After); or the service is shutting down"))}


EXPLAIN_PARAMETERS = [
    {"name": "method", "in": "query", "required": False, "schema": {"type": "string", "enum": list(METHODS), "default": "auto"},
     "description": "auto: Grad-CAM for CNN backbones, gradient x input for transformers (as test.py --explain)"}]
ENHANCE_PARAMETERS = [
    {"name": "params", "in": "query", "required": False, "schema": {"type": "string", "default": ",".join(PARAMS)},
     "description": f"comma-separated parameters to optimise, of: {', '.join(PARAMS)}"},
    {"name": "steps", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": STEPS[0], "maximum": STEPS[1], "default": STEPS[2]}, "description": "gradient steps"},
    {"name": "lr", "in": "query", "required": False,
     "schema": {"type": "number", "minimum": LR[0], "maximum": LR[1], "default": LR[2]},
     "description": "Adam's learning rate on the parameters' unbounded form"},
    {"name": "sweep", "in": "query", "required": False, "schema": {"type": "string", "enum": [*PARAMS, "none"],
                                                                   "default": DEFAULT_SWEEP},
     "description": "also score the photo at sweep_steps settings of this parameter (none: no sweep)"},
    {"name": "sweep_steps", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": SWEEP_STEPS[0], "maximum": SWEEP_STEPS[1], "default": SWEEP_STEPS[2]},
     "description": "settings in the sweep, from the lower bound through neutral to the upper one"}]
