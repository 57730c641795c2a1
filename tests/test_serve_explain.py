"""POST /explain and POST /enhance, the offline /docs and the web page's files, against a
real serve.py (served_tiny, with an API key): the heat map picture has the photo's size
and is grey where the model cannot look, the scores equal /score's for the same file and
the enhanced score is /score's of the image returned; each query parameter at, below and
past its limits; /docs loads nothing from another host and declares the API key. The
bad-input and key checks /score has run on these routes too (test_serve.py)."""
import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SERVED_KEY

PHOTOS = f"{ROOT}/tests/data/photos"
TIMEOUT_S = 120
RESIZE, CROP = 40, 32  # tiny_ckpt's preprocessing


def client(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": SERVED_KEY}, timeout=TIMEOUT_S)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def made_photo(w, h, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def picture(data_url: str) -> Image.Image:
    head, _, payload = data_url.partition(",")
    assert head == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert img.format == "JPEG"
    return img.convert("RGB")


def post(c, route, name, data, query=""):
    return c.post(route + query, files=[("file", (name, data, "application/octet-stream"))])


def hand_crop_box(w, h):
    """Where the centre crop lies in the photo, by hand: the shorter side resized to 40
    (the longer one truncated), a 32 crop at rounded offsets, mapped back to the photo."""
    rw, rh = (RESIZE, int(RESIZE * h / w)) if w <= h else (int(RESIZE * w / h), RESIZE)
    left, top = round((rw - CROP) / 2), round((rh - CROP) / 2)
    return left * w / rw, top * h / rh, (left + CROP) * w / rw, (top + CROP) * h / rh


@pytest.mark.subprocess
def test_explain_heat_maps(served_tiny):
    wide = made_photo(2100, 1000, seed=1)  # longer than the working size: reduced to 2048 wide
    files = {"chelsea.png": open(f"{PHOTOS}/chelsea.png", "rb").read(), "wide.png": png(wide),
             "tall.png": png(made_photo(90, 160, seed=2))}
    with client(served_tiny) as c:
        answer = c.post("/explain", files=[("file", (n, d, "image/png")) for n, d in files.items()])
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        scores = {n: post(c, "/score", n, d).json()["results"][0] for n, d in files.items()}
        other = post(c, "/explain", "tall.png", files["tall.png"], "?method=gradient-x-input").json()["results"][0]
    assert [r["filename"] for r in results] == list(files)
    sizes = {"chelsea.png": (451, 300), "tall.png": (90, 160)}
    for r in results:
        name = r["filename"]
        if name == "wide.png":
            assert r["width"] == 2048 and abs(r["height"] - 1000 * 2048 / 2100) <= 1
        else:
            assert (r["width"], r["height"]) == sizes[name]
            # The photo explained is the photo scored: the same centre crop, the same numbers.
            assert r["mean"] == pytest.approx(scores[name]["mean"], abs=1e-5)
            assert np.allclose(r["distribution"], scores[name]["distribution"], atol=1e-5)
        assert picture(r["heatmap"]).size == (r["width"], r["height"])
        assert r["method"] == "grad-cam" and r["layer"].startswith("features")
        assert r["crop_box"] == pytest.approx(hand_crop_box(r["width"], r["height"]), abs=0.01)
    # Outside the crop the model sees nothing: the picture is the photo in grey there.
    chelsea = next(r for r in results if r["filename"] == "chelsea.png")
    x0 = int(chelsea["crop_box"][0])
    shown = np.asarray(picture(chelsea["heatmap"])).astype(float)[:, : x0 - 4]
    photo = np.asarray(Image.open(f"{PHOTOS}/chelsea.png").convert("RGB")).astype(float)[:, : x0 - 4]
    luma = photo @ np.array([0.299, 0.587, 0.114])
    assert np.abs(shown - luma[..., None]).mean() < 3  # JPEG's error, not a colour
    assert other["method"] == "gradient-x-input" and other["layer"] == "input pixels"
    assert picture(other["heatmap"]).size == (90, 160)


@pytest.mark.subprocess
def test_enhance_scores_are_those_of_the_images_returned(served_tiny, tiny_ckpt, tmp_path):
    data = open(f"{PHOTOS}/chelsea.png", "rb").read()
    with client(served_tiny) as c:
        r = post(c, "/enhance", "chelsea.png", data, "?steps=12&sweep_steps=5").json()["results"][0]
        before = post(c, "/score", "chelsea.png", data).json()["results"][0]["mean"]
        enhanced = base64.b64decode(r["image"].partition(",")[2])
        after = post(c, "/score", "enhanced.jpg", enhanced).json()["results"][0]["mean"]
    assert r["score_before"] == pytest.approx(before, abs=1e-5)
    assert r["score_after"] == pytest.approx(after, abs=1e-5)  # what the person downloads scores what is shown
    assert picture(r["image"]).size == (451, 300) == (r["width"], r["height"])
    assert len(r["history"]) == 13 and 0 <= r["best_step"] <= 12
    for name, value in r["params"].items():
        assert r["bounds"][name]["lower"] <= value <= r["bounds"][name]["upper"], name
    if r["raised"]:
        assert r["score_after"] > r["score_before"] and r["note"] == ""
    else:
        assert r["note"] and all(v == r["bounds"][n]["neutral"] for n, v in r["params"].items())
    # The sweep: contrast 0.6 .. 1.5 through 1 (the photo as it is), by hand.
    s = r["sweep"]
    assert s["param"] == "contrast" and s["values"] == pytest.approx([0.6, 0.8, 1.0, 1.25, 1.5])
    assert s["scores"][2] == pytest.approx(r["score_before"], abs=1e-5)
    assert [max(picture(p).size) for p in s["images"]] == [256] * 5
    # The same photo through tools.enhance: the same settings and scores.
    from tools import enhance as enhance_cli
    (tmp_path / "chelsea.png").write_bytes(data)
    argv = ["--model", str(tiny_ckpt), "--image", str(tmp_path / "chelsea.png"), "--out", str(tmp_path / "out"),
            "--steps", "12", "--device", "cpu", "--quiet"]
    assert enhance_cli.main(enhance_cli.get_args_parser().parse_args(argv)) == 0
    record = json.loads((tmp_path / "out" / "enhance.json").read_text())
    assert record["params"] == pytest.approx(r["params"], abs=1e-6)
    assert record["score_after"] == pytest.approx(r["score_after"], abs=1e-5)


TINY = png(made_photo(64, 48, seed=3))
# (query, status, check of the one result or words of the 400's detail)
ENHANCE_QUERIES = [
    ("?steps=0&sweep=none", 200, lambda r: len(r["history"]) == 1 and not r["raised"] and r["sweep"] is None),
    ("?steps=100&sweep=none", 200, lambda r: len(r["history"]) == 101),
    ("?steps=101", 400, "steps='101'"), ("?steps=-1", 400, "steps='-1'"), ("?steps=1.5", 400, "whole number"),
    ("?steps=abc", 400, "from 0 to 100"),
    ("?lr=0.0001&steps=2&sweep=none", 200, lambda r: r["lr"] == 0.0001), ("?lr=0.00009", 400, "lr='0.00009'"),
    ("?lr=10&steps=2&sweep=none", 200, lambda r: r["lr"] == 10), ("?lr=10.01", 400, "from 0.0001 to 10"),
    ("?lr=nan", 400, "lr='nan'"), ("?lr=inf", 400, "lr='inf'"),
    ("?sweep_steps=2&steps=1", 200, lambda r: r["sweep"]["values"] == pytest.approx([0.6, 1.5])),
    ("?sweep_steps=15&steps=1", 200, lambda r: len(r["sweep"]["values"]) == 15 and r["sweep"]["values"][7] == pytest.approx(1.0)),
    ("?sweep_steps=1", 400, "from 2 to 15"), ("?sweep_steps=16", 400, "sweep_steps='16'"),
    ("?sweep=sharpness&sweep_steps=3&steps=1", 200, lambda r: r["sweep"]["values"] == pytest.approx([-0.5, 0.0, 1.5])),
    ("?sweep=blur", 400, "one of brightness, contrast"),
    ("?params=gamma&steps=3&sweep=none", 200, lambda r: list(r["params"]) == ["gamma"]),
    ("?params=contrast,brightness&steps=3&sweep=none", 200, lambda r: list(r["params"]) == ["brightness", "contrast"]),
    ("?params=gamma,blur", 400, "params='gamma,blur'"), ("?params=", 400, "comma-separated names"),
    ("?step=3", 400, "unknown query parameter 'step'"),
]
EXPLAIN_QUERIES = [
    ("?method=auto", 200, lambda r: r["method"] == "grad-cam"),
    ("?method=grad-cam", 200, lambda r: r["method"] == "grad-cam"),
    ("?method=gradient-x-input", 200, lambda r: r["method"] == "gradient-x-input"),
    ("?method=gradcam", 400, "one of auto, grad-cam, gradient-x-input"), ("?methods=auto", 400, "unknown query parameter"),
]


@pytest.mark.subprocess
@pytest.mark.slow
def test_query_parameters_at_and_past_their_limits(served_tiny):
    with client(served_tiny) as c:
        for route, queries in (("/enhance", ENHANCE_QUERIES), ("/explain", EXPLAIN_QUERIES)):
            for query, status, check in queries:
                response = post(c, route, "tiny.png", TINY, query)
                assert response.status_code == status, (route, query, response.text)
                if status == 200:
                    assert check(response.json()["results"][0]), (route, query)
                else:
                    body = response.json()
                    assert body["error"] == "bad_parameter" and check in body["detail"], (route, query, body)
        # The query is checked before the body is read, the key before the query.
        big = c.post("/enhance?steps=500", content=bytes(30 * 1024 * 1024), headers={"Content-Type": "image/jpeg"})
        assert big.status_code == 400 and big.json()["error"] == "bad_parameter"
    keyless = httpx.post(served_tiny.url + "/enhance?steps=500", content=TINY, headers={"Content-Type": "image/png"},
                         timeout=TIMEOUT_S)
    assert keyless.status_code == 401
    assert httpx.get(served_tiny.url + "/health", timeout=10).json() == {"status": "ok"}


def local_urls(html: str) -> list:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.subprocess
def test_docs_offline_and_the_key_declared(served_tiny):
    with client(served_tiny) as c:
        docs = c.get("/docs")
        assert docs.status_code == 200
        urls = local_urls(docs.text)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert "http://" not in docs.text and "https://" not in docs.text
        for url in urls:
            assert c.get(url).status_code == 200, url
        schema = c.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["X-API-Key"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                    "description": schemes["X-API-Key"]["description"]}
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    for path, method in (("/score", "post"), ("/explain", "post"), ("/enhance", "post"), ("/model", "get"),
                         ("/metrics", "get")):
        assert {"X-API-Key": []} in schema["paths"][path][method]["security"], path
    assert "security" not in schema["paths"]["/health"]["get"]
    names = {p["name"] for p in schema["paths"]["/enhance"]["post"]["parameters"]}
    assert names == {"params", "steps", "lr", "sweep", "sweep_steps"}
    assert "multipart/form-data" in schema["paths"]["/explain"]["post"]["requestBody"]["content"]


@pytest.mark.subprocess
def test_page_and_its_files_are_all_served_here(served_tiny):
    with httpx.Client(base_url=served_tiny.url, timeout=TIMEOUT_S) as c:  # no key: the page is open
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and page.headers["x-content-type-options"] == "nosniff"
        files = local_urls(page.text)
        scripts = [u for u in files if u.endswith(".js")]
        for script in scripts:  # the modules the page's script imports
            text = c.get(script).text
            files += ["/static/" + m for m in re.findall(r'from "\./([\w.-]+)"', text)]
        assert {"/static/app.js", "/static/api.js", "/static/cards.js", "/static/style.css", "/favicon.ico"} <= set(files)
        for url in set(files) - {"/docs"}:
            answer = c.get(url)
            assert answer.status_code == 200, url
            if not url.endswith(".ico"):  # nothing fetched from another host (the SVG namespace is a name)
                assert not re.search(r"https?://", answer.text.replace("http://www.w3.org/2000/svg", "")), url
        icon = Image.open(io.BytesIO(c.get("/favicon.ico").content))
        assert icon.format == "ICO"
        missing = c.get("/static/none.js")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
