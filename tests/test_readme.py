"""The README's commands, run as written on tiny data: a sandbox folder holds what each
command expects to find (the demo's data set and checkpoint, an AVA-like image folder
with its AVA.txt, a folder of photos with MOS labels), and every python command of the
README runs there, in the README's order, from its own text. Training commands get
`--pretrained none` (offline), `--epochs 1` and 32-px crops appended, the only changes;
the service is started on a free port. (Every command of README.md and docs/ is also
parsed by tests/test_commands.py.)"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, run_main
from tools import make_demo_data

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

TRAIN_OVERRIDES = ["--pretrained", "none", "--epochs", "1", "--image_size", "32", "--resize_size", "40", "--num_workers", "0"]
SCRIPTS = ("main.py", "test.py", "serve.py")


def readme_blocks():
    """(language, body) of each fenced block of README.md, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)]


def shell_commands():
    """The README's python commands (continuations joined, comments dropped), in order."""
    out = []
    for lang, body in readme_blocks():
        if lang not in ("sh", "bash", ""):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["python"] and len(words) > 1 and (words[1] in SCRIPTS or words[1] == "-m"):
                out.append(words)
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """What the README's commands expect, made small."""
    box = tmp_path_factory.mktemp("readme")
    demo = box / "data" / "demo"
    make_demo_data.main(["--out", str(demo), "--num_images", "80", "--seed", "0"])
    # runs/demo/best.pth as `make demo` makes it, for one epoch.
    assert run_main(["--train", "--img_path", demo / "images", "--train_csv_file", demo / "train_labels.csv",
                     "--val_csv_file", demo / "val_labels.csv", "--ckpt_path", box / "runs" / "demo",
                     "--base_model", "tiny_cnn", "--pretrained", "none", "--conv_base_lr", "0.01", "--dense_lr", "0.01",
                     "--epochs", "1", "--train_batch_size", "32", "--num_workers", "0", "--quiet"]) == 0
    # An AVA download in miniature: images/ and AVA.txt (index, id, 10 vote counts, 2 tags, challenge).
    shutil.copytree(demo / "images", box / "images")
    lines = []
    for name in ("train", "val", "test"):
        with open(demo / f"{name}_labels.csv") as f:
            for row in f:
                cells = row.strip().split(",")
                lines.append(f"{len(lines) + 1} {cells[0][len('demo'):]} {' '.join(cells[1:])} 0 0 1")
    (box / "AVA.txt").write_text("\n".join(lines) + "\n")
    for path in (box / "images").iterdir():  # AVA's file names are the numeric ids
        path.rename(path.with_name(path.name[len("demo"):]))
    # Your own photos with MOS labels on 1..5 (image_id,mos,std).
    shutil.copytree(demo / "images", box / "photos")
    for name, part in (("train.csv", "train"), ("val.csv", "val")):
        with open(demo / f"{part}_labels.csv") as f, open(box / name, "w") as out:
            out.write("image_id,mos,std\n")
            for row in f:
                cells = row.strip().split(",")
                votes = [float(v) for v in cells[1:]]
                mean = sum((i + 1) * v for i, v in enumerate(votes)) / sum(votes)
                out.write(f"{cells[0]},{1 + (mean - 1) * 4 / 9:.4f},0.6\n")
    return box


def as_argv(words, box):
    """The command's words for subprocess: this Python, the repository's scripts."""
    rest = words[1:]
    if rest[0] in SCRIPTS:
        rest = [os.path.join(ROOT, rest[0]), *rest[1:]]
    return [sys.executable, *rest]


def run_in(box, argv, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(argv, cwd=box, env=env, capture_output=True, text=True, timeout=timeout)


def serve_and_ask(box, argv):
    """Start the README's serve.py command on a free port; ask / and /score as its curl does."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(box / "serve.log", "w+")
    proc = subprocess.Popen([*argv, "--port", "0"], cwd=box, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            log.seek(0)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", log.read())
            port = m and int(m.group(1))
        assert port, f"serve.py printed no address: {(box / 'serve.log').read_text()}"
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        curl = [w for w in shell_words_of("curl")][0]
        files = [w.split("@", 1)[1] for w in curl if w.startswith("file=@")]
        with open(box / files[0], "rb") as f:
            answer = httpx.post(f"{base}/score", files={"file": (os.path.basename(files[0]), f.read())}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert 1 <= answer.json()["results"][0]["mean"] <= 10
        page = httpx.get(f"{base}/", timeout=10)  # the web page
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def shell_words_of(program):
    for lang, body in readme_blocks():
        if lang in ("sh", "bash", ""):
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == [program]:
                    yield words


def test_readme_commands_run_as_written(sandbox):
    commands = shell_commands()
    scripts = [w[1] if w[1] in SCRIPTS else w[2] for w in commands]
    assert {"test.py", "main.py", "serve.py", "tools.ava_to_csv"} <= set(scripts), scripts
    for words in commands:
        argv = as_argv(words, sandbox)
        if words[1] == "serve.py":
            serve_and_ask(sandbox, argv)
            continue
        if words[1] == "main.py":
            argv += TRAIN_OVERRIDES if "--init_from" not in words else ["--epochs", "1", "--num_workers", "0"]
        done = run_in(sandbox, argv)
        assert done.returncode == 0, f"{' '.join(words)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def test_readme_python_runs_as_written(sandbox):
    blocks = [body for lang, body in readme_blocks() if lang == "python"]
    assert blocks
    for body in blocks:
        done = run_in(sandbox, [sys.executable, "-c", body], timeout=300)
        assert done.returncode == 0, f"{body}\n{done.stderr[-2000:]}"
        assert "Score(mean=" in done.stdout
