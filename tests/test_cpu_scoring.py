"""Scoring on a laptop: the CPU defaults of test.py (what --amp, --channels_last and
--threads resolve to, and the line that says so), and bench/cpu_scoring.py's quick mode
(it times test.py against the reference-style loop; no time is asserted here)."""
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, run_test
from engine import loaders


def test_cpu_defaults_bound_memory_and_leave_the_cores_to_torch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loaders.default_batch_size(cpu) == 8 and loaders.default_batch_size(cuda) == 64
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: {0, 1})
    assert loaders.default_workers(cpu, 1, 8) == 0          # one photo: no worker process to start
    assert loaders.default_workers(cpu, 8, 8) == 0          # one batch
    assert loaders.default_workers(cpu, 9, 8) == 1
    assert loaders.default_workers(cuda, 1000, 64) == 2
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loaders.default_workers(cpu, 1000, 8) == 4
    assert loaders.default_workers(cuda, 1000, 64) == 8


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 1), (4, 1), (5, 1), (8, 2), (16, 4), (64, 8)])
def test_threads_and_workers_follow_the_cores_this_process_may_use(monkeypatch, cores, workers):
    """Not os.cpu_count(): a process under taskset or in a cpuset container may use fewer.
    torch gets a thread per such core, the loader 1 worker up to 4 cores, a quarter above (8 at most)."""
    from engine.runtime import resolve_threads
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(loaders.os, "cpu_count", lambda: 128)  # the machine's count must not be used
    assert loaders.available_cores() == cores
    assert resolve_threads(None, torch.device("cpu")) == cores
    assert resolve_threads(3, torch.device("cpu")) == 3          # --threads wins
    assert resolve_threads(None, torch.device("cuda")) is None   # the network runs on the device
    assert loaders.default_workers(torch.device("cpu"), 1000, 8) == workers


# (native bf16, backbone, training, --amp, --channels_last) -> (bf16 autocast, channels_last) on
# a CPU, with vgg16 in both tables (bf16 kept its scores and is faster, channels_last is faster
# in either precision) and resnet50 in neither.
CPU_SPEED = [
    ((True, "vgg16", False, "auto", "auto"), (True, True)),     # bf16 and channels_last: both measured faster, scores kept
    ((False, "vgg16", False, "auto", "auto"), (False, True)),   # no native bf16: float32, the faster layout
    ((True, "vgg16", True, "auto", "auto"), (False, False)),    # training on a CPU stays float32, default layout
    ((True, "vgg16", False, "off", "auto"), (False, True)),     # --amp off: exact float32; the layout is still picked
    ((True, "vgg16", False, "off", "off"), (False, False)),
    ((True, "vgg16", True, "on", "on"), (True, True)),          # asked for: training too
    ((True, "resnet50", False, "auto", "auto"), (False, False)),  # not measured for its scores: float32
    ((True, "resnet50", False, "on", "auto"), (True, False)),
    ((True, None, False, "auto", "auto"), (False, False)),      # no backbone named: nothing assumed
]


@pytest.mark.parametrize("case, expected", CPU_SPEED, ids=["-".join(map(str, c)) for c, _ in CPU_SPEED])
def test_auto_speed_flags_on_a_cpu(monkeypatch, case, expected):
    from engine import runtime
    native, backbone, training, amp, channels_last = case
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(runtime, "CPU_BF16_BACKBONES", frozenset({"vgg16"}))
    monkeypatch.setattr(runtime, "CPU_CHANNELS_LAST", {"bf16": frozenset({"vgg16"}), "float32": frozenset({"vgg16"})})
    assert runtime.resolve_speed_flags(amp, channels_last, torch.device("cpu"), backbone, training=training) == expected


def test_what_auto_picks_today_on_a_cpu_with_native_bf16(monkeypatch):
    """The measured tables: VGG16 in float32 and channels_last (bf16 missed the score
    bounds: tests/test_cpu_precision.py), tiny_cnn as it was."""
    from engine import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert runtime.resolve_speed_flags("auto", "auto", cpu, "vgg16") == (False, True)
    assert runtime.resolve_speed_flags("auto", "auto", cpu, "tiny_cnn") == (False, False)


def test_the_tables_of_auto_name_real_backbones():
    from engine.runtime import CPU_BF16_BACKBONES, CPU_CHANNELS_LAST
    from model import list_backbones
    assert CPU_BF16_BACKBONES <= set(list_backbones())
    assert set(CPU_CHANNELS_LAST) == {"bf16", "float32"}
    assert all(names <= set(list_backbones()) for names in CPU_CHANNELS_LAST.values())


def test_native_bf16_is_what_torch_reports(monkeypatch):
    from engine import runtime
    for avx512_bf16, amx, native in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(runtime.torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(runtime.torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert runtime.cpu_has_native_bf16() is native
    monkeypatch.delattr(runtime.torch.cpu, "_is_avx512_bf16_supported")  # an older torch without the probes
    monkeypatch.delattr(runtime.torch.cpu, "_is_amx_tile_supported")
    assert runtime.cpu_has_native_bf16() is False


def test_test_py_says_once_what_auto_chose(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """The runtime line: device, precision, layout, threads, workers, decoding; --threads
    sets torch's threads (restored afterwards: the tests share this process)."""
    from engine import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime, "CPU_BF16_BACKBONES", frozenset({"tiny_cnn"}))
    monkeypatch.setattr(runtime, "CPU_CHANNELS_LAST", {"bf16": frozenset(), "float32": frozenset({"tiny_cnn"})})
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(3):
        Image.new("RGB", (60, 50), (40 * n, 90, 200)).save(photos / f"{n}.jpg")
    before = torch.get_num_threads()
    try:
        for extra, line in [([], "runtime: cpu, native bf16: tiny_cnn in bf16 autocast, contiguous layout, 1 thread, "
                                 "0 loader workers, JPEG draft decoding"),
                            (["--amp", "off", "--exact_decode"],
                             "runtime: cpu, native bf16: tiny_cnn in float32, channels_last, 1 thread, 0 loader workers, "
                             "exact decoding")]:
            assert run_test(["--model", tiny_ckpt, "--test_images", photos, "--predictions", tmp_path / "out",
                             "--device", "cpu", "--threads", "1", "--quiet", *extra]) == 0
            printed = capsys.readouterr().out.splitlines()
            assert [p for p in printed if p.startswith("runtime:")] == [line]
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.subprocess
@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
def test_a_process_under_taskset_counts_its_own_cores():
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                           "from engine.loaders import available_cores; print(available_cores())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_cpu_scoring_bench_quick_mode_reports_every_way(tmp_path):
    out = tmp_path / "cpu.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.cpu_scoring", "--quick", "--data", str(tmp_path / "data"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "import torch, torchvision" in proc.stdout
    assert "test.py's defaults here: runtime: cpu" in proc.stdout  # what auto chose, in test.py's own words
    import json
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["set"], r["photos"], r["way"]) for r in rows] == [("ava", 1, w) for w in ("reference", "old", "new", "bf16")]
    for r in rows:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_pss_mb"] > 0
    assert all(r["speedup_vs_reference"] > 0 for r in rows[1:])


def test_the_steady_rate_leaves_start_up_out():
    from bench.cpu_scoring import steady_rate
    # 5 s of start-up, then 10 images/s: the two largest sizes give exactly 10
    assert steady_rate([1, 32, 256], [5.1, 8.2, 30.6]) == pytest.approx(10.0)
    assert steady_rate([256, 32], [30.6, 8.2]) == pytest.approx(10.0)  # any order
    assert steady_rate([1], [5.1]) is None


def test_the_scorer_takes_the_cpu_default_batch(tmp_path):
    from engine.runtime import Runtime
    from engine.score.scorer import Scorer
    from model import build_model, default_model_args
    args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    scorer = Scorer(build_model(args).eval(), args, Runtime(torch.device("cpu"), show_progress=False))
    assert scorer.batch_size == loaders.default_batch_size(torch.device("cpu")) == 8
