"""What the tests share: a small generated data set, the two CLIs run in-process, the
markers (pytest.ini) with one CUDA skip, and helpers several test modules use: tiny
checkpoints, image files of every kind, hand-made expectations (resizes, crops and inputs
computed with PIL and numpy, not with the code under test), and torchrun process helpers.
Test modules import these from here, never from each other."""
import csv
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import main as main_cli  # noqa: E402
import test as test_cli  # noqa: E402
from model import build_model, default_model_args, save_checkpoint  # noqa: E402
from model.registry import get_backbone  # noqa: E402
from bench.attacks import jpeg_scan_bomb  # noqa: E402,F401  (hostile files live in bench/attacks.py)
from tools import make_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """60 procedural images (96x72 / 72x96) with train/val/test CSVs of vote counts."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(["--out", str(out), "--num_images", "60", "--seed", "1"])
    return out


def tiny_train_args(data, ckpt, *extra):
    """main.py flags for a fast CPU run on `data` (a make_demo_data folder)."""
    return ["--train", "--img_path", str(data / "images"), "--train_csv_file", str(data / "train_labels.csv"),
            "--val_csv_file", str(data / "val_labels.csv"), "--ckpt_path", str(ckpt),
            "--snapshot_dir", str(ckpt / "snapshots"), "--base_model", "tiny_cnn", "--pretrained", "none",
            "--image_size", "32", "--resize_size", "40", "--train_batch_size", "8", "--val_batch_size", "16",
            "--num_workers", "0", "--conv_base_lr", "0.01", "--dense_lr", "0.01", "--epochs", "2", "--quiet", *extra]


def run_main(argv):
    return main_cli.main(main_cli.get_args_parser().parse_args([str(a) for a in argv]))


def run_test(argv):
    return test_cli.main(test_cli.get_args_parser().parse_args([str(a) for a in argv]))


# The files that take longest on 2 cores (each over 40 s), run first: `make test` spreads
# whole files over two processes (pytest-xdist), and a long file that started last would
# run alone at the end.
LONGEST_FILES = ("test_cpu_precision.py", "test_defaults.py", "test_collection_bench.py", "test_cpu_scoring.py",
                 "test_serve_attacks.py", "test_distributed.py", "test_recipes.py", "test_serve_connections.py",
                 "test_collection_dist.py", "test_ranks.py", "test_readme.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FILES; the others keep their order), and the one
    way a test says it needs CUDA: @pytest.mark.gpu. Without a CUDA device those tests
    are skipped here, with one reason."""
    first = {name: n for n, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: a file's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One tiny_cnn checkpoint (32 px crops, seed 0) for the tests that only read it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


# ---- checkpoints and images ------------------------------------------------------------

EXIF_ORIENTATION = 0x0112

def tiny_checkpoint(path, seed=0):
    """A randomly initialised tiny_cnn NIMA saved in our checkpoint format (README, "Formats")."""
    torch.manual_seed(seed)
    model_args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    save_checkpoint(path, {"model": build_model(model_args).state_dict(), "model_args": model_args})
    return path


def noise(rng, w=48, h=40, channels=3):
    return rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def make_photo_folder(root):
    """One valid image per format/mode (ids -> expected readable), plus broken files in a
    nested folder. Returns (valid relative paths, broken relative paths)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "broken").mkdir(parents=True)
    Image.fromarray(noise(rng)).save(root / "a_rgb.jpg", quality=90)
    Image.fromarray(noise(rng, channels=4), "RGBA").save(root / "b_rgba.png")
    pal = Image.fromarray(noise(rng)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(root / "c_palette_transparent.png", transparency=0)
    Image.fromarray(noise(rng, channels=1), "L").save(root / "d_gray.png")
    Image.fromarray(noise(rng, channels=2), "LA").save(root / "e_gray_alpha.png")
    Image.fromarray((noise(rng, channels=1).astype(np.uint16) * 257)).save(root / "f_16bit.png")
    Image.fromarray(noise(rng)).convert("CMYK").save(root / "g_cmyk.tif")
    Image.fromarray(noise(rng)).save(root / "h.webp", quality=90)
    Image.fromarray(noise(rng)).save(root / "i.bmp")
    frames = [Image.new("RGB", (48, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "sub" / "j_animated.gif", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored landscape, shown portrait (rotate 90 degrees clockwise)
    Image.fromarray(noise(rng, w=48, h=32)).save(root / "sub" / "k_exif6.jpg", exif=exif.tobytes())
    # Broken: zero bytes, a JPEG cut in half, text with an image name; plus a non-image to ignore.
    (root / "sub" / "broken" / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(noise(rng, 96, 80)).save(buf, "JPEG", quality=95)
    (root / "sub" / "broken" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "sub" / "broken" / "text.jpg").write_text("not a picture\n")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    valid = ["a_rgb.jpg", "b_rgba.png", "c_palette_transparent.png", "d_gray.png", "e_gray_alpha.png", "f_16bit.png",
             "g_cmyk.tif", "h.webp", "i.bmp", "sub/j_animated.gif", "sub/k_exif6.jpg"]
    broken = ["sub/broken/text.jpg", "sub/broken/truncated.jpg", "sub/broken/zero.jpg"]
    return valid, broken


# ---- hand-made expectations ----------------------------------------------------------

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # torchvision's published statistics


IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def hand_resize(img, shorter):
    """torchvision's Resize(int) on a PIL image, by hand: the shorter side to `shorter`,
    the longer one scaled and truncated, bilinear. An (H, W, 3) uint8 array."""
    img = img.convert("RGB")
    w, h = img.size
    new = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
    return np.asarray(img.resize(new, Image.BILINEAR) if new != img.size else img)


def hand_crops(path, resize_size, size):
    """The ten TTA crops of an image file, by hand: resized (hand_resize), then centre
    (offsets rounded half to even, as torchvision's CenterCrop), top-left, top-right,
    bottom-left, bottom-right, then each of the five mirrored left-right. (H, W, 3) uint8
    arrays; the first is the evaluation crop."""
    with Image.open(path) as img:
        a = hand_resize(img, resize_size)
    h, w = a.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    five = [a[top:top + size, left:left + size], a[:size, :size], a[:size, w - size:],
            a[h - size:, :size], a[h - size:, w - size:]]
    return five + [c[:, ::-1] for c in five]


def to_input(crop, normalize):
    """ToTensor, then ImageNet's mean and std if asked: a (3, H, W) float tensor."""
    x = crop.astype(np.float32) / 255.0
    if normalize == "imagenet":
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def hand_quantiles(values):
    """101 quantiles by hand: level k % sits at position k * (n - 1) / 100 of the sorted
    values, between its two neighbours by linear interpolation."""
    v, out = sorted(values), []
    for k in range(101):
        pos = k * (len(v) - 1) / 100
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def hand_percentile(x, q):
    """The share (%) of a set scored lower than x, read off its 101 quantiles q: 0 at or
    below the lowest, 100 above the highest, else k - 1 plus the fraction of the way from
    q[k-1] to q[k], where q[k] is the first quantile at or above x."""
    if x <= q[0]:
        return 0.0
    if x > q[-1]:
        return 100.0
    k = next(i for i, v in enumerate(q) if v >= x)
    return (k - 1) + (x - q[k - 1]) / (q[k] - q[k - 1])


def percentile_written_ok(mean, written, q) -> bool:
    """Whether a predictions.csv percentile (2 decimals) fits its mean (6 decimals, so the
    unrounded mean is within 5e-7 of it): hand_percentile of the mean's range, +-0.005."""
    lo, hi = hand_percentile(mean - 5e-7, q), hand_percentile(mean + 5e-7, q)
    return lo - 0.0051 <= written <= hi + 0.0051


def small_args(name, **extra):
    """model_args at a small input, to keep the CPU tests fast: 64 px, so that the last
    feature maps are still 2x2 (batch-norm statistics over a batch of 2 at 1x1 make the
    gradients explode); 32 for vgg16 (no batch norm); more where the backbone needs it
    (inception_v3: 75)."""
    spec = get_backbone(name)
    size = max(32 if name == "vgg16" else 64, spec.min_image_size)
    return dict(default_model_args(name), image_size=size, resize_size=size + 8, **extra)


# ---- torchrun jobs ------------------------------------------------------------------

def children(pid):
    """Direct child PIDs of `pid`, from /proc (psutil is not a dependency)."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # the process is gone
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def worker_with_rank(torchrun_pid, rank):
    for pid in children(torchrun_pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun {torchrun_pid}")


def stop_job(proc):
    """Kill a torchrun job left running by a failed test, its workers first."""
    if proc.poll() is None:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


# ---- serve.py in a subprocess --------------------------------------------------------

SERVE_START_TIMEOUT_S = 120   # model load and the decoding processes' imports, on a busy 2-core machine


class Server:
    """serve.py in a subprocess on a free loopback port (--port 0: the port it printed);
    $NIMA_API_KEY only from `env`. wait_ready() returns it once /health answers."""

    def __init__(self, ckpt, log_path, *extra, env=None, workers=1):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(ckpt), "--host", "127.0.0.1",
                                      "--port", "0", "--device", "cpu", "--workers", str(workers), "--log_level", "warning",
                                      *map(str, extra)],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**{k: v for k, v in os.environ.items() if k != "NIMA_API_KEY"}, **(env or {})})
        self.url = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, headers=None) -> "Server":
        import httpx  # requirements-test.txt; imported here so that conftest needs it only for servers

        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve.py exited with {self.proc.returncode}:\n{self.output()}"
            if self.url is None:
                found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.output())
                self.url = found.group(1) if found else None
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"serve.py not ready after {SERVE_START_TIMEOUT_S} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The fork server and its children (the decoders) are not the service's
            # children: killed with it, not left behind.
            below = [p for p in process_tree(self.proc.pid) if p != self.proc.pid]
            self.proc.kill()
            self.proc.wait(timeout=30)
            for pid in below:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


def _cmdline(pid) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def fork_server(pid):
    """The multiprocessing fork server started by serve.py `pid` (None if none)."""
    found = [c for c in children(pid) if b"forkserver" in _cmdline(c)] if os.path.exists(f"/proc/{pid}") else []
    return found[0] if found else None


def decoder_processes(pid) -> list:
    """The pids of serve.py's decoding processes: the children of its fork server."""
    server = fork_server(pid)
    return sorted(children(server)) if server is not None and os.path.exists(f"/proc/{server}") else []


def process_tree(pid) -> list:
    """`pid` and every process below it, from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            found.append(p)
            todo += children(p)
    return found


def tree_memory(pid) -> tuple:
    """(RSS, PSS) in bytes, summed over the process tree of `pid`. RSS counts the pages
    forked processes share once per process; PSS divides them among their sharers."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        rss += int(re.search(r"^Rss:\s+(\d+) kB", text, re.M).group(1)) * 1024
        pss += int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1)) * 1024
    return rss, pss


# ---- collections: folders and tar shards ----------------------------------------------

def jpeg(rng, w=64, h=48, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_tar(path, members):
    """members: [(name, bytes)] written in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_mixed(root, photos=40, per_shard=20):
    """A folder (nested, 2 unreadable files) and 3 shards (a .json beside each image, one
    unreadable member each, the key 'dup' in two of them). Returns the paths."""
    rng = np.random.default_rng(3)
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for n in range(photos):
        (folder / ("sub" if n % 3 == 0 else "") / f"p{n:03d}.{'png' if n % 4 == 0 else 'jpg'}").write_bytes(
            jpeg(rng, fmt="PNG" if n % 4 == 0 else "JPEG"))
    (folder / "sub" / "bad.jpg").write_text("not a picture\n")
    whole = jpeg(rng, 96, 80)
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    shards = root / "shards"
    shards.mkdir()
    for k in range(3):
        members = []
        for n in range(per_shard):
            members += [(f"s{k}_{n:03d}.jpg", jpeg(rng)), (f"s{k}_{n:03d}.json", b'{"n": %d}' % n)]
        members.insert(5, (f"broken{k}.jpg", b"garbage, not a jpeg"))
        if k < 2:
            members.append(("dup.webp", jpeg(rng, fmt="WEBP")))
        write_tar(shards / f"{k:06d}.tar", members)
    return folder, shards


def read_rows(out, name="predictions.csv"):
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def row_numbers(rs):
    return np.array([[float(r[k]) for k in ("mean", "std", *(f"p{i}" for i in range(1, 11)))] for r in rs])


SERVED_KEY = "page-test-key"


@pytest.fixture(scope="session")
def served_tiny(tiny_ckpt, tmp_path_factory):
    """serve.py on tiny_ckpt (32 px crops of a 40 px resize) requiring the API key
    SERVED_KEY, shared by the tests of /explain, /enhance and the web page."""
    server = Server(tiny_ckpt, tmp_path_factory.mktemp("served") / "serve.log", env={"NIMA_API_KEY": SERVED_KEY})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


# ---- talking to serve.py: a small JPEG, /score, /metrics, raw HTTP over a socket ----------

def small_jpeg(seed=0) -> bytes:
    return jpeg(np.random.default_rng(seed))


def score(server, data: bytes, timeout=60, **kwargs):
    """POST `data` to the server's /score as one JPEG body; the httpx answer."""
    import httpx
    return httpx.post(server.url + "/score", content=data, headers={"Content-Type": "image/jpeg"},
                      timeout=timeout, **kwargs)


def server_metric(server, name: str) -> float:
    """The value of metric `name` (with its labels, if any) in the server's /metrics; 0 if absent."""
    import httpx
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def connect(server, timeout=30) -> socket.socket:
    """A raw connection to the server, for what no polite client does (idle, slow, malformed)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_answer(sock) -> tuple:
    """(status, headers dict, body bytes) of the answer on `sock`, read to its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of an answer"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock) -> bool:
    """True when the server has closed `sock` (EOF, or a reset), within its timeout."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def read_until_closed(sock):
    """What the server sent on `sock` before closing it (b"" for nothing), or None when it
    did not close it within the socket's timeout."""
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except ConnectionResetError:
        return received
    except TimeoutError:
        return None


def post_head(length: int, path="/score", content_type="image/jpeg") -> bytes:
    """A POST's request line and header, announcing a body of `length` bytes."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
