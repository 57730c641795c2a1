"""serve.py's limits at their edges, and batched requests whose neighbours go away.

One real server on a loopback port with small limits: a body of exactly --max_body_mb
is accepted and one byte more refused (declared or chunked, raw or multipart); exactly
--max_files parts accepted, one more refused; an image of exactly --max_image_pixels,
and one whose resize is exactly that, accepted, one pixel (one resized column) more
refused. Then requests batched together while one client in every position drops its
connection: each answer is the sequential answer for its own image."""
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import Server, tiny_checkpoint

MAX_BODY_MB = 0.25
MAX_BODY = 262_144           # 0.25 MiB in bytes: the largest body allowed
MAX_FILES = 3
MAX_PIXELS = 20_000
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_limits")
    ckpt = tiny_checkpoint(root / "tiny.pth")  # resize 40, crop 32
    # Batches wait up to 300 ms for up to 4 images: concurrent requests share a forward pass.
    srv = Server(ckpt, root / "server.log", "--max_body_mb", MAX_BODY_MB, "--max_files", MAX_FILES,
                 "--max_image_pixels", MAX_PIXELS, "--max_batch", 4, "--max_wait_ms", 300)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def png(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def padded_jpeg(total: int) -> bytes:
    """A valid JPEG padded with zeros (which decoders ignore after its end) to `total` bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue() + bytes(total - len(buf.getvalue()))


BOUNDARY = "edge-boundary"


def multipart_body(parts) -> bytes:
    """parts: [(field name, file name or None, bytes)], written by hand."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def multipart_of_size(total: int) -> bytes:
    """One file part, its JPEG padded so that the whole body is `total` bytes."""
    overhead = len(multipart_body([("file", "a.jpg", b"")]))
    return multipart_body([("file", "a.jpg", padded_jpeg(total - overhead))])


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def post(server, content, headers) -> httpx.Response:
    return httpx.post(server.url + "/score", content=content, headers=headers, timeout=REQUEST_TIMEOUT_S)


def chunked(data: bytes, size=64 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.subprocess
@pytest.mark.parametrize("size,status", [(MAX_BODY - 1, 200), (MAX_BODY, 200), (MAX_BODY + 1, 413)])
@pytest.mark.parametrize("kind", ["raw", "raw chunked", "multipart", "multipart chunked"])
def test_max_body_mb_at_below_and_past(server, size, status, kind):
    body = padded_jpeg(size) if kind.startswith("raw") else multipart_of_size(size)
    assert len(body) == size
    headers = {"Content-Type": "image/jpeg"} if kind.startswith("raw") else MULTIPART
    response = post(server, chunked(body) if kind.endswith("chunked") else body, headers)
    assert response.status_code == status, (kind, size, response.text)
    if status == 413:
        assert response.json()["error"] == "body_too_large" and f"--max_body_mb {MAX_BODY_MB:g}" in response.json()["detail"]
    else:
        assert "mean" in response.json()["results"][0]


@pytest.mark.subprocess
@pytest.mark.parametrize("files,fields,status", [(2, 0, 200), (3, 0, 200), (4, 0, 413), (3, 3, 200), (3, 4, 413)])
def test_max_files_at_below_and_past(server, files, fields, status):
    """--max_files bounds the file parts, and separately the text fields (named 'note' here,
    which the service ignores)."""
    parts = [("file", f"{n}.png", png(20, 16, seed=n)) for n in range(files)]
    parts += [("note", None, b"hello") for _ in range(fields)]
    response = post(server, multipart_body(parts), MULTIPART)
    assert response.status_code == status, response.text
    if status == 200:
        assert [r["filename"] for r in response.json()["results"]] == [f"{n}.png" for n in range(files)]
    else:
        assert response.json()["error"] == "too_many_parts" and f"more than {MAX_FILES} parts" in response.json()["detail"]


@pytest.mark.subprocess
@pytest.mark.parametrize("w,h,ok,words", [
    (199, 100, True, ""), (200, 100, True, ""), (201, 100, False, "too large: 201x100 = 20100 pixels"),
    # 21x263 resizes to 40 x int(40 * 263 / 21) = 40 x 500 = 20,000 pixels; 21x264 to 40 x 502.
    (21, 263, True, ""), (21, 264, False, "too elongated: 21x264"),
])
def test_max_image_pixels_at_below_and_past(server, w, h, ok, words):
    response = post(server, png(w, h), {"Content-Type": "image/png"})
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422 and response.json()["error"] == "image_too_large", response.text
        assert words in response.json()["detail"] and f"--max_image_pixels {MAX_PIXELS}" in response.json()["detail"]


# ---- batched requests, some of whose clients go away -----------------------------------

IMAGES = {f"img{n}.png": png(24 + 4 * n, 20 + 3 * n, seed=10 + n) for n in range(8)}


def multipart_files(names):
    return [("file", (name, IMAGES[name], "image/png")) for name in names]


def drop_after_sending(server, names, reset: bool) -> None:
    """A client that sends its whole request, then goes away before the answer: a plain
    close, or a reset (SO_LINGER 0)."""
    body = multipart_body([("file", n, IMAGES[n]) for n in names])
    host, port = server.url.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.05)  # its images are being decoded or waiting for their batch
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.subprocess
@pytest.mark.slow
def test_batched_answers_are_each_requests_own_when_clients_go_away(server):
    names = list(IMAGES)
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
        alone = {n: c.post("/score", files=multipart_files([n])).json()["results"][0] for n in names}
        before = c.get("/metrics").text
    # Rounds of 4 concurrent requests (one with two images); the client at `gone` drops
    # its connection. Every position, with a close and with a reset.
    rounds = [(gone, reset) for gone in range(4) for reset in (False, True)]
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=8)) as c:
        for r, (gone, reset) in enumerate(rounds):
            requests = [[names[(r + k) % 8]] for k in range(4)]
            requests[(gone + 1) % 4] = [names[(r + 5) % 8], names[(r + 6) % 8]]  # two images in one request
            start = threading.Barrier(4)

            def one(k):
                start.wait(timeout=30)
                if k == gone:
                    return drop_after_sending(server, requests[k], reset)
                return c.post("/score", files=multipart_files(requests[k]))

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(one, range(4)))
            for k, response in enumerate(answers):
                if k == gone:
                    continue
                assert response.status_code == 200, response.text
                results = response.json()["results"]
                assert [x["filename"] for x in results] == requests[k]
                for got in results:
                    want = alone[got["filename"]]
                    assert got["mean"] == pytest.approx(want["mean"], abs=1e-6), (r, k, got["filename"])
                    assert np.allclose(got["distribution"], want["distribution"], atol=1e-6), (r, k, got["filename"])
        after = c.get("/metrics").text
    batches = metric(after, "nima_batch_size_count") - metric(before, "nima_batch_size_count")
    single = metric(after, 'nima_batch_size_bucket{le="1.0"}') - metric(before, 'nima_batch_size_bucket{le="1.0"}')
    assert single < batches, "no batch held more than one image: the rounds did not test batching"
    assert 'kind="internal_error"' not in after, after
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
