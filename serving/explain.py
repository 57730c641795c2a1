"""POST /explain and POST /enhance: test.py --explain's heat map and tools.enhance's
enhancement of uploaded photos, over /score's request path (API key, uploads, limits,
decoding processes, the error contract: serving/app.py). Options are query parameters,
checked before the body is read (400 bad_parameter names the parameter and what is valid).

Each photo is decoded by the decoding processes, reduced to at most WORK_SIDE pixels on
its longer side (which bounds the memory one photo can take here), and its model work
(gradients) runs on the model thread in turn with /score's batches (one photo at a time:
gradients do not batch across requests). Pictures come back inside the JSON as data URLs
(data:image/jpeg;base64,...), so a page can show them without another request.
"""
import asyncio
import base64
import math

from engine.explain.enhance import enhance_photo, jpeg_bytes, sweep
from engine.explain.params import PARAMS, check_params
from engine.explain.heatmaps import METHODS, explain_image
from engine.explain.pictures import heat_overlay, thumbnail
from engine.explain.pixels import crop_box
from engine.metrics import mean_and_std

from serving.errors import ServiceError

WORK_SIDE = 2048          # longest side, in pixels, of the photo explained or enhanced
OVERLAY_QUALITY = 90      # JPEG quality of the heat map picture
ENHANCED_QUALITY = 95     # of the enhanced photo (tools.enhance's default)
SWEEP_THUMB_SIDE = 256    # longest side of each picture of a sweep
STEPS = (0, 100, 30)      # /enhance steps: lowest, highest, default (tools.enhance's)
LR = (1e-4, 10.0, 0.1)    # learning rate: lowest, highest, default
SWEEP_STEPS = (2, 15, 7)  # settings in a sweep: lowest, highest, default
DEFAULT_SWEEP = "contrast"
EXPLAIN_QUERY = ("method",)
ENHANCE_QUERY = ("params", "steps", "lr", "sweep", "sweep_steps")


def _bad(name: str, value: str, valid: str) -> ServiceError:
    return ServiceError(400, "bad_parameter", f"query parameter {name}={value!r}: {valid}")


def _check_names(query, allowed) -> None:
    unknown = sorted(set(query.keys()) - set(allowed))
    if unknown:
        raise ServiceError(400, "bad_parameter", f"unknown query parameter {', '.join(map(repr, unknown))}; "
                           f"this route takes {', '.join(allowed)}")


def _number(query, name: str, bounds: tuple, kind):
    lo, hi, default = bounds
    text = query.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(name, text, f"give {'a whole number' if kind is int else 'a number'} from {lo:g} to {hi:g}")
    return value


def explain_options(query) -> dict:
    _check_names(query, EXPLAIN_QUERY)
    method = query.get("method", "auto")
    if method not in METHODS:
        raise _bad("method", method, f"one of {', '.join(METHODS)}")
    return {"method": method}


def enhance_options(query) -> dict:
    _check_names(query, ENHANCE_QUERY)
    text = query.get("params", ",".join(PARAMS))
    try:
        names = check_params(text.split(","))
    except ValueError:
        raise _bad("params", text, f"comma-separated names of: {', '.join(PARAMS)}") from None
    swept = query.get("sweep", DEFAULT_SWEEP)
    if swept not in (*PARAMS, "none"):
        raise _bad("sweep", swept, f"one of {', '.join(PARAMS)}, or none")
    return {"names": names, "steps": _number(query, "steps", STEPS, int), "lr": _number(query, "lr", LR, float),
            "sweep": None if swept == "none" else swept, "sweep_steps": _number(query, "sweep_steps", SWEEP_STEPS, int)}


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


async def explain_one(service, upload, options: dict) -> tuple:
    """(result entry, error kind or '') for one upload, as ScoringService._score_one."""
    rgb, kind, reason = await service.read_photo(upload, WORK_SIDE)
    if rgb is None:
        return {"filename": upload.filename, "error": reason}, kind
    scorer = service.scorer
    heat, dist, info = await service.on_model(explain_image, scorer.model, scorer.model_args, rgb, scorer.rt.device,
                                              options["method"])
    picture = await asyncio.to_thread(lambda: data_url(jpeg_bytes(heat_overlay(rgb, heat), OVERLAY_QUALITY)))
    means, stds = mean_and_std(dist[None])
    return {"filename": upload.filename, "width": rgb.size[0], "height": rgb.size[1], "mean": float(means[0]),
            "std": float(stds[0]), "distribution": [float(p) for p in dist], "method": info["method"],
            "layer": info["layer"], "crop_box": [round(v, 2) for v in crop_box(rgb.size, scorer.model_args)],
            "heatmap": picture}, ""


def _sweep_pictures(images) -> list:
    return [data_url(jpeg_bytes(thumbnail(img, SWEEP_THUMB_SIDE), OVERLAY_QUALITY)) for img in images]


async def enhance_one(service, upload, options: dict) -> tuple:
    rgb, kind, reason = await service.read_photo(upload, WORK_SIDE)
    if rgb is None:
        return {"filename": upload.filename, "error": reason}, kind
    scorer = service.scorer
    model, args, device = scorer.model, scorer.model_args, scorer.rt.device
    names, steps = options["names"], options["steps"]
    done = await service.on_model(enhance_photo, model, args, rgb, names, steps, options["lr"], device, ENHANCED_QUALITY)
    entry = {"filename": upload.filename, "width": rgb.size[0], "height": rgb.size[1],
             "score_before": done["before"], "score_after": done["after"], "raised": done["raised"], "note": done["note"],
             "params": done["values"], "found": done["found"]["values"],
             "bounds": {n: {"lower": PARAMS[n][0], "neutral": PARAMS[n][1], "upper": PARAMS[n][2]} for n in names},
             "steps": steps, "lr": options["lr"], "best_step": done["found"]["best_step"],
             "history": done["found"]["history"], "image": data_url(done["jpeg"]), "sweep": None}
    if options["sweep"]:
        name = options["sweep"]
        values, images, scores = await service.on_model(sweep, model, args, rgb, name, options["sweep_steps"], device)
        entry["sweep"] = {"param": name, "values": values, "scores": scores,
                          "images": await asyncio.to_thread(_sweep_pictures, images)}
    return entry, ""
