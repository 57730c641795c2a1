"""bench/bench.py: the quick run works and reports every figure (no time is asserted),
and the reference-style loop it measures computes the same loss as ours."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import bench as bench_cli
from bench.figures import ALL
from bench.reference_loop import looped_emd_loss, looped_mean_std
from bench.timing import TimedBatches, repeat
from engine.metrics import mean_and_std
from model import default_model_args, emd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_FIGURES = ("train_synthetic", "infer_synthetic", "train_jpeg", "infer_jpeg")


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_run_reports_every_figure(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.bench", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    seen = {(r["figure"], r["variant"], r["data"]) for r in records}
    assert {r["figure"] for r in records} == set(ALL)
    for figure in REFERENCE_FIGURES:
        assert (figure, "reference", "original" if figure.endswith("jpeg") else "synthetic") in seen
    for variant in ("ours fp32", "ours channels_last"):  # the CPU's speed flag combinations
        assert ("train_synthetic", variant, "synthetic") in seen and ("infer_synthetic", variant, "synthetic") in seen
    cache = f"cache{default_model_args('tiny_cnn')['resize_size']}"  # made with --size = the resize size
    for figure in ("decode_1core", "loader", "train_jpeg", "infer_jpeg"):
        assert {r["data"] for r in records if r["figure"] == figure} >= {"original", cache}
    # The loader paths: uint8 crops (the CUDA default) and JPEGs decoded on the device.
    assert {("train_jpeg", "ours fp32, uint8 loader", cache), ("infer_jpeg", "ours fp32, uint8 loader", cache),
            ("infer_jpeg", "ours fp32, device decode", "original"), ("infer_jpeg", "ours fp32, device decode", cache)} <= seen
    for r in records:
        if r["figure"] == "train_synthetic":
            assert r["gflop_per_image"] > 0 and r["achieved_tflops"] > 0
    for r in records:
        assert r["images_per_s"] > 0 and r["device"] == "cpu" and "CPU" in r["hardware"]
        if r["variant"].startswith("ours"):
            assert r["ratio"] > 0 and r["ratio_to"] == "reference"
        if r["figure"] == "train_jpeg":
            assert r["loader_wait_ms_per_step"] >= 0
        if r["figure"] == "loader":
            assert r["images_per_s_per_worker"] > 0 and r["workers"] == 1
    assert "figure" in proc.stdout and "images/s" in proc.stdout  # the table after the JSON lines


def test_bad_usage_exit_2(capsys):
    args = bench_cli.get_args_parser().parse_args(["--quick", "--device", "cpu", "--only", "train_synthetic,warp_speed"])
    assert bench_cli.main(args) == 2
    assert "warp_speed" in capsys.readouterr().err
    args = bench_cli.get_args_parser().parse_args(["--quick", "--device", "cpu", "--variants", "fp32,fp64"])
    assert bench_cli.main(args) == 2
    assert "fp64" in capsys.readouterr().err


def test_variants_select_what_runs(capsys):
    """--variants channels_last: no reference (so no ratio), no fp32."""
    args = bench_cli.get_args_parser().parse_args(["--quick", "--device", "cpu", "--only", "train_synthetic",
                                                   "--variants", "channels_last"])
    assert bench_cli.main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in records] == ["ours channels_last"] and "ratio" not in records[0]


def test_reference_loops_compute_the_same_values():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(6, 10), 1), torch.softmax(torch.randn(6, 10), 1)
    assert torch.allclose(looped_emd_loss(p.view(-1, 10, 1), q.view(-1, 10, 1)), emd_loss(p, q), atol=1e-6)
    mean, std = mean_and_std(p[:1].numpy())
    assert looped_mean_std(p[0].view(10, 1)) == pytest.approx((mean[0], std[0]), abs=1e-5)


def test_timed_batches_counts_only_steps_after_warmup():
    timer = TimedBatches(repeat("batch", 5), total=5, warmup=2, batch_size=4)
    assert len(timer) == 5 and list(timer) == ["batch"] * 5
    result = timer.finish("cpu")
    assert result["steps"] == 3 and result["images_per_s"] > 0 and result["loader_wait_ms_per_step"] >= 0
    with pytest.raises(ValueError, match="warm-up"):
        TimedBatches(repeat("batch", 2), total=2, warmup=2, batch_size=4)


@pytest.mark.subprocess
def test_gpu_check_helpers(tmp_path, monkeypatch, capsys):
    """bench/gpu_steps.py's parsers and comparisons (the device run has no second try),
    and gpu_check.sh's syntax."""
    from bench import gpu_records, gpu_steps
    log = "training\nV1 Recompiling function forward in nima.py:27\nepoch 1: train EMD 0.2\n" \
          "Recompiling function forward in nima.py:27\nepoch 2: train EMD 0.1\nepoch 3: train EMD 0.1\n"
    assert gpu_records.count_recompiles(log) == [1, 1, 0, 0]
    counts = gpu_steps._pytest_counts("FAILED tests/test_a.py::test_x - AssertionError\n"
                                      "1 failed, 140 passed, 6 skipped in 150.2s\n")
    assert counts == {"failed": 1, "passed": 140, "skipped": 6, "failing": ["tests/test_a.py::test_x"]}
    jsonl = tmp_path / "r.jsonl"
    monkeypatch.setenv("GPU_CHECK_JSONL", str(jsonl))
    monkeypatch.setenv("GPU_CHECK_STEP", "parity")
    header = "image_id,mean,std," + ",".join(f"p{k}" for k in range(1, 11)) + "\n"
    for name, p1 in (("a", 0.1), ("b", 0.10002)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.csv").write_text(
            header + f"x.jpg,5.5,1.0,{p1}," + ",".join(["0.1"] * 9) + "\n")
    assert gpu_steps.main(["compare", "--name", "cmp", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    for name, images, seconds in (("small", 1000, 11.0), ("big", 10000, 20.0)):
        gpu_records.emit({"name": name, "rc": 0, "images": images, "seconds": seconds})
    assert gpu_steps.main(["marginal", "--name", "m", "--small", "small", "--big", "big"]) == 0
    records = {r["name"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert records["cmp"]["step"] == "parity" and records["cmp"]["max_abs_prob_diff"] == pytest.approx(2e-5)
    assert records["cmp"]["within"] == {"1e-05": False, "0.0001": True, "0.001": True, "0.01": True}
    assert records["m"]["images_per_s"] == pytest.approx(1000.0) and records["m"]["startup_seconds"] == pytest.approx(10.0)
    assert gpu_steps.main(["summary", str(jsonl)]) == 0 and "m: images_per_s=1000" in capsys.readouterr().out
    # run --records: each line of the file the command wrote becomes a record of its own.
    serve = tmp_path / "serve.jsonl"
    serve.write_text('{"mode": "direct", "base_model": "vgg16", "images_per_s": 100.0}\n'
                     '{"mode": "service", "base_model": "vgg16", "concurrency": 32, "ratio_to_direct": 0.75}\n')
    assert gpu_steps.main(["run", "--name", "serve_load", "--log", str(tmp_path / "s.log"), "--records", str(serve),
                           "--", sys.executable, "-c", "pass"]) == 0
    records = {r["name"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert records["serve_load/vgg16/direct"]["images_per_s"] == 100.0
    assert records["serve_load/vgg16/service/c32"]["ratio_to_direct"] == 0.75 and records["serve_load"]["rc"] == 0
    for script in ("bench/gpu_check.sh", "bench/gpu_prepare.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(ROOT, script)]).returncode == 0
