"""serve.py, the HTTP scoring service: a real server in a subprocess on a loopback port,
a real client (httpx). Scores equal test.py's; concurrent requests are batched and
answered like sequential ones; bad input gets its status and leaves the server up;
the API key; SIGTERM during a burst answers every accepted request and exits 0."""
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import serve as serve_cli
from conftest import ROOT, Server, decoder_processes, run_main, run_test, tiny_train_args

KEY = "s3cret-key"
EXIF_ORIENTATION = 0x0112
REQUEST_TIMEOUT_S = 60
# The main server's limits, small so that the tests' images and bodies can exceed them.
MAX_BODY_MB, MAX_PIXELS, MAX_FILES = 2, 100_000, 8


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    """A tiny_cnn trained for one epoch, test images in four formats, the main server
    (API key from the environment) and the SIGTERM test's server, started together."""
    root = tmp_path_factory.mktemp("serve")
    assert run_main(tiny_train_args(demo_data, root / "ckpt", "--epochs", "1")) == 0
    ckpt = root / "ckpt" / "best.pth"
    images = make_images(root / "images")
    main = Server(ckpt, root / "main.log", "--max_body_mb", MAX_BODY_MB, "--max_image_pixels", MAX_PIXELS,
                  "--max_files", MAX_FILES, "--max_batch", 8, "--max_wait_ms", 20, env={"NIMA_API_KEY": KEY})
    # Batches wait up to 3 s here, so that a burst is still in flight when SIGTERM comes.
    burst = Server(ckpt, root / "burst.log", "--max_batch", 64, "--max_wait_ms", 3000)
    try:
        yield {"root": root, "ckpt": ckpt, "images": images, "main": main.wait_ready(), "burst": burst.wait_ready()}
    finally:
        main.stop()
        burst.stop()


def make_images(folder):
    """JPEG, PNG, WebP and an EXIF-rotated JPEG (stored 120x80, shown 80x120), each of
    a different size and content. Returns {name: bytes}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)

    def noise(w, h):
        small = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
        return Image.fromarray(small).resize((w, h), Image.BICUBIC)

    noise(96, 72).save(folder / "a.jpg", quality=90)
    noise(64, 100).save(folder / "b.png")
    noise(110, 70).save(folder / "c.webp", quality=90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    noise(120, 80).save(folder / "d_exif6.jpg", quality=90, exif=exif.tobytes())
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def client(server, key=KEY, **kwargs) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=REQUEST_TIMEOUT_S, **kwargs)


def multipart(named: dict) -> list:
    return [("file", (name, data, "application/octet-stream")) for name, data in named.items()]


def assert_up(server) -> None:
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}


def scores_of(answer) -> dict:
    return {r["filename"]: r for r in answer["results"]}


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def png_bytes(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.subprocess
@pytest.mark.slow
def test_scores_equal_test_py(setup, tmp_path):
    out = tmp_path / "pred"
    assert run_test(["--model", setup["ckpt"], "--test_images", setup["root"] / "images", "--predictions", out,
                     "--workers", "0", "--quiet"]) == 0
    with open(out / "predictions.csv", newline="") as f:
        expected = {r["image_id"]: r for r in csv.DictReader(f)}
    images = setup["images"]
    assert sorted(expected) == sorted(images)
    with client(setup["main"]) as c:
        many = c.post("/score", files=multipart(images))
        assert many.status_code == 200, many.text
        answer = many.json()
        assert answer["model"] == {"checkpoint": "best.pth", "base_model": "tiny_cnn"}
        assert [r["filename"] for r in answer["results"]] == list(images)  # request order
        raw = {name: c.post("/score", content=data, headers={"Content-Type": "image/" + name.rsplit(".", 1)[1]})
               for name, data in images.items()}
    for name, row in expected.items():
        want = [float(row[f"p{k}"]) for k in range(1, 11)]
        for got in (scores_of(answer)[name], raw[name].json()["results"][0]):
            assert got["mean"] == pytest.approx(float(row["mean"]), abs=1e-5), name
            assert got["std"] == pytest.approx(float(row["std"]), abs=1e-5), name
            assert np.allclose(got["distribution"], want, atol=1e-5), name
    assert raw["a.jpg"].json()["results"][0]["filename"] is None  # a raw body has no file name


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


@pytest.mark.subprocess
def test_concurrent_requests_are_batched_and_equal_sequential(setup):
    images = setup["images"]
    names = list(images)
    with client(setup["main"]) as c:
        sequential = {name: c.post("/score", files=multipart({name: images[name]})).json()["results"][0]
                      for name in names}
        before = c.get("/metrics").text
    with client(setup["main"], limits=httpx.Limits(max_connections=16)) as c:
        def one(n):
            name = names[n % len(names)]
            return name, c.post("/score", files=multipart({name: images[name]}))

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(200)))
        after = c.get("/metrics").text
    assert [r.status_code for _, r in answers] == [200] * 200
    for name, response in answers:
        got, want = response.json()["results"][0], sequential[name]
        assert got["filename"] == name
        assert got["mean"] == pytest.approx(want["mean"], abs=1e-6)
        assert np.allclose(got["distribution"], want["distribution"], atol=1e-6)
    batches = metric(after, "nima_batch_size_count") - metric(before, "nima_batch_size_count")
    single = metric(after, 'nima_batch_size_bucket{le="1.0"}') - metric(before, 'nima_batch_size_bucket{le="1.0"}')
    images_run = metric(after, "nima_batch_size_sum") - metric(before, "nima_batch_size_sum")
    assert images_run == 200 and batches < 200 and single < batches  # some batches held more than one image
    assert metric(after, 'nima_http_requests_total{route="/score",status="200"}') >= 204


class Listener:
    """A loopback TCP port that records whether anything connected: the URL sent to the
    service points here, and the service must never fetch it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = "http://127.0.0.1:%d/photo.jpg" % self.sock.getsockname()[1]

    def contacted(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except (socket.timeout, TimeoutError):
            return False
        conn.close()
        return True


def chunked(data: bytes, size=256 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


# Every image route takes the same uploads through the same checks; /enhance with few steps
# and no sweep keeps its successful answers quick. The field each one's success carries.
IMAGE_ROUTES = {"/score": "mean", "/explain": "mean", "/enhance?steps=3&sweep=none": "score_before"}


@pytest.mark.subprocess
@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_bad_input_gets_its_status_and_the_server_stays_up(setup, route):
    server, images = setup["main"], setup["images"]
    value = IMAGE_ROUTES[route]
    jpeg = images["a.jpg"]
    listener = Listener()
    big = b"\xff\xd8" + bytes(30 * 1024 * 1024)  # 30 MB, over --max_body_mb 2
    cases = [
        # (what, request kwargs, status, error kind, words in the detail)
        ("30 MB raw body", dict(content=big, headers={"Content-Type": "image/jpeg"}), 413, "body_too_large", "--max_body_mb"),
        ("30 MB multipart", dict(files=multipart({"big.jpg": big})), 413, "body_too_large", "--max_body_mb"),
        ("3 MB chunked body, no Content-Length", dict(content=chunked(bytes(3 * 1024 * 1024)),
                                                       headers={"Content-Type": "image/jpeg"}), 413, "body_too_large", "limit"),
        ("a URL as text/plain", dict(content=listener.url.encode(), headers={"Content-Type": "text/plain"}),
         415, "unsupported_media_type", "never fetches URLs"),
        ("a URL as a form field", dict(data={"file": listener.url}), 415, "unsupported_media_type", "multipart"),
        ("a URL as a multipart text field", dict(files=[("file", (None, listener.url))]), 422, "not_a_file", "never fetches"),
        ("a path as a multipart text field", dict(files=[("file", (None, "/etc/passwd"))]), 422, "not_a_file", "opens paths"),
        ("no Content-Type", dict(content=jpeg), 415, "unsupported_media_type", "no Content-Type"),
        ("JSON", dict(json={"url": listener.url}), 415, "unsupported_media_type", "application/json"),
        ("not an image", dict(content=b"hello, not a picture", headers={"Content-Type": "image/jpeg"}),
         422, "not_an_image", "accepted format"),
        ("an image format not accepted", dict(files=multipart({"x.ppm": b"P6\n2 2\n255\n" + bytes(12)})),
         422, "not_an_image", "JPEG, PNG"),
        ("an image over --max_image_pixels", dict(files=multipart({"big.png": png_bytes(400, 300)})),
         422, "image_too_large", "--max_image_pixels 100000"),
        ("a strip too long once resized", dict(files=multipart({"strip.png": png_bytes(4000, 2)})),
         422, "image_too_large", "too elongated"),
        ("a truncated JPEG alone", dict(content=truncated_jpeg(), headers={"Content-Type": "image/jpeg"}),
         422, "unreadable_image", "truncated"),
        ("empty body", dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body", "empty"),
        ("an empty file", dict(files=multipart({"empty.jpg": b""})), 422, "unreadable_image", "0 bytes"),
        ("no field named file", dict(files=[("image", ("a.jpg", jpeg))]), 400, "no_file_field", "'image'"),
        ("multipart without a boundary", dict(content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}),
         400, "malformed_multipart", "boundary"),
        ("malformed multipart", dict(content=b"--xyz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xyz--\r\n",
                                     headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
         400, "malformed_multipart", "name"),
        ("more files than --max_files", dict(files=multipart({f"{n}.jpg": jpeg for n in range(MAX_FILES + 1)})),
         413, "too_many_parts", "--max_files"),
    ]
    with client(server) as c:
        for what, kwargs, status, kind, words in cases:
            response = c.post(route, **kwargs)
            assert response.status_code == status, (what, response.text)
            body = response.json()
            assert body["error"] == kind and words in body["detail"], (what, body)
            assert_up(server)
        for method, path, status, kind in (("GET", "/score", 405, "method_not_allowed"), ("GET", "/nope", 404, "not_found")):
            response = c.request(method, path)
            assert response.status_code == status and response.json()["error"] == kind
            assert "POST /score" in response.json()["detail"]
        # A truncated JPEG among valid ones: that entry says why, the others are scored. The
        # padded JPEG (1.2 MB of zeros after its end, which decoders ignore) is a part large
        # enough to be spooled to a temporary file by the multipart parser.
        mixed = {"a.jpg": jpeg, "broken.jpg": truncated_jpeg(), "b.png": images["b.png"],
                 "padded.jpg": jpeg + bytes(1_200_000)}
        response = c.post(route, files=multipart(mixed))
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["filename"] for r in results] == list(mixed)
        assert results[1] == {"filename": "broken.jpg", "error": "truncated image"}
        alone = c.post(route, files=multipart({"b.png": images["b.png"]})).json()["results"][0]
        assert results[2][value] == pytest.approx(alone[value], abs=1e-6)
        assert results[3][value] == pytest.approx(results[0][value], abs=1e-6)
        # Every image unreadable: 422, each one's reason listed.
        response = c.post(route, files=multipart({"x.jpg": b"nope", "y.jpg": truncated_jpeg()}))
        assert response.status_code == 422
        assert [r["error"] for r in response.json()["results"]] == [
            "not an image in an accepted format (JPEG, PNG, WEBP, GIF, BMP, TIFF)", "truncated image"]
        errors = c.get("/metrics").text
    assert not listener.contacted(), "the service fetched a URL sent in a request"
    assert metric(errors, 'nima_errors_total{kind="body_too_large"}') >= 3
    path = route.split("?")[0]
    assert metric(errors, f'nima_http_requests_total{{route="{path}",status="413"}}') >= 4
    assert_up(server)


@pytest.mark.subprocess
@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_api_key(setup, route):
    server, jpeg = setup["main"], setup["images"]["a.jpg"]
    raw = {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}}
    for headers, word in (({}, "missing"), ({"Authorization": "Bearer wrong"}, "wrong"), ({"X-API-Key": "wrong"}, "wrong"),
                          ({"X-API-Key": KEY[:-1]}, "wrong"), ({"Authorization": KEY}, "missing"),
                          ({"Authorization": f"Basic {KEY}"}, "missing")):
        response = httpx.post(server.url + route, content=jpeg, timeout=REQUEST_TIMEOUT_S,
                              headers={"Content-Type": "image/jpeg", **headers})
        assert response.status_code == 401, headers
        assert response.json()["error"] == "unauthorized" and "Bearer" in response.headers["www-authenticate"]
        assert word in response.json()["detail"], headers
    for path in ("/model", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401
    # The page and its files hold no data: open, as /health and /docs.
    for path in ("/", "/static/app.js", "/favicon.ico", "/docs"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    with client(server, key=None) as c:
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"}, {"X-API-Key": KEY}):
            response = c.post(route, content=raw["content"], headers={**raw["headers"], **headers})
            assert response.status_code == 200, headers
            assert IMAGE_ROUTES[route] in response.json()["results"][0]
    assert_up(server)  # /health needs no key: load balancers probe it


@pytest.mark.subprocess
def test_model_metrics_and_docs(setup):
    with client(setup["main"]) as c:
        info = c.get("/model").json()
        assert info["checkpoint"] == "best.pth" and info["device"] == "cpu" and info["bf16"] is False
        assert info["model_args"]["base_model"] == "tiny_cnn" and info["model_args"]["image_size"] == 32
        assert info["preprocessing"]["resize_shorter_side"] == 40 and info["preprocessing"]["crop"] == "centre 32"
        assert info["limits"]["max_image_pixels"] == MAX_PIXELS and info["api_key_required"] is True
        assert str(setup["root"]) not in json.dumps(info)  # the file name only, never the server's paths
        text = c.get("/metrics")
        assert text.headers["content-type"].startswith("text/plain")
        for name in ("nima_http_requests_total", "nima_images_total", "nima_batch_size_bucket",
                     "nima_request_seconds_bucket", "nima_score_requests_in_progress"):
            assert name in text.text
        docs = c.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        schema = c.get("/openapi.json").json()
        assert "multipart/form-data" in schema["paths"]["/score"]["post"]["requestBody"]["content"]


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="finds the decoding processes in /proc")
def test_a_dead_decoding_process_is_replaced(setup):
    """A decoder that crashes on a hostile file (here: killed) fails that attempt only:
    the pool is rebuilt and the request still scored."""
    server = setup["main"]
    workers = decoder_processes(server.proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    with client(server) as c:
        response = c.post("/score", files=multipart({"a.jpg": setup["images"]["a.jpg"]}))
    assert response.status_code == 200 and "mean" in response.json()["results"][0], response.text
    assert "a decoding process died" in server.output()
    assert decoder_processes(server.proc.pid) not in ([], workers)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_during_a_burst_answers_every_accepted_request(setup):
    server, images = setup["burst"], setup["images"]
    names = list(images)
    burst = 12
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=burst)) as c:
        with ThreadPoolExecutor(burst) as pool:
            futures = [pool.submit(c.post, "/score", files=multipart({names[n % 4]: images[names[n % 4]]}))
                       for n in range(burst)]
            deadline = time.monotonic() + 30
            while metric(httpx.get(server.url + "/metrics", timeout=10).text, "nima_score_requests_in_progress") < burst:
                assert time.monotonic() < deadline, "the burst never reached the server"
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            refused = False  # new connections are refused while the burst is still being answered
            deadline = time.monotonic() + 5
            while not refused and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=1).close()
                    time.sleep(0.05)
                except OSError:
                    refused = True
            pending = sum(not f.done() for f in futures)
            answers = [f.result() for f in futures]
    assert refused and pending > 0
    assert [a.status_code for a in answers] == [200] * burst
    assert all("mean" in a.json()["results"][0] for a in answers)
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert "stopped by SIGTERM" in server.output()


@pytest.mark.subprocess
def test_usage_errors_exit_2_before_serving(setup, capsys, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    monkeypatch.delenv("NIMA_API_KEY", raising=False)
    for argv, words in ((["--max_batch", "0"], "--max_batch must be >= 1"),
                        (["--max_body_mb", "0"], "--max_body_mb must be > 0"),
                        (["--max_image_pixels", "0"], "--max_image_pixels"),
                        (["--api_key", " "], "--api_key is empty"),
                        (["--max_inflight_mb", "0"], "--max_inflight_mb must be > 0"),
                        (["--header_timeout", "0"], "--header_timeout must be > 0"),
                        (["--shutdown_timeout", "-1"], "--shutdown_timeout must be >= 0"),
                        (["--queue_timeout", "30"], "--queue_timeout (30) must be below --body_timeout (30)"),
                        (["--decode_timeout", "-1"], "--decode_timeout must be >= 0"),
                        (["--max_decode_mb", "0"], "--max_decode_mb must be > 0"),
                        (["--normalize", "none"], "--normalize none contradicts"),
                        (["--port", str(port)], f"cannot listen on --host 127.0.0.1 --port {port}")):
        args = serve_cli.get_args_parser().parse_args(["--model", str(setup["ckpt"]), "--device", "cpu", *argv])
        assert serve_cli.main(args) == 2, argv
        assert words in capsys.readouterr().err, argv
    args = serve_cli.get_args_parser().parse_args(["--model", str(setup["root"] / "missing.pth")])
    assert serve_cli.main(args) == 2 and "missing.pth" in capsys.readouterr().err
    monkeypatch.setenv("NIMA_API_KEY", "")
    args = serve_cli.get_args_parser().parse_args(["--model", str(setup["ckpt"])])
    assert serve_cli.main(args) == 2 and "$NIMA_API_KEY is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: --max_b could be --max_batch or --max_body_mb
        serve_cli.get_args_parser().parse_args(["--model", "x", "--max_b", "1"])
    taken.close()


@pytest.mark.slow
@pytest.mark.subprocess
def test_bench_quick(tmp_path):
    out = tmp_path / "serve_load.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.serve_load", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    service = [r for r in records if r["mode"] == "service"]
    assert {r["concurrency"] for r in service} == {1, 4}
    for r in service:
        assert r["requests_per_s"] > 0 and r["images_per_s"] > 0 and r["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert "cores" in r["hardware"]
    direct = [r for r in records if r["mode"] == "direct"]
    assert len(direct) == 1 and direct[0]["images_per_s"] > 0
    assert all(r["ratio_to_direct"] > 0 for r in service)
    assert "images/s" in proc.stdout


@pytest.mark.subprocess
def test_ctrl_c_exits_0(setup):
    """Last: it stops the main server."""
    server = setup["main"]
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert "stopped by SIGINT" in server.output()
