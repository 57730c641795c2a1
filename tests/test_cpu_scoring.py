"""Scoring on a laptop: the CPU defaults of test.py, and bench/cpu_scoring.py's quick mode
(it times test.py against the reference-style loop; no time is asserted here)."""
import pytest
import subprocess
import sys

import torch

from conftest import ROOT
from engine import loaders


def test_cpu_defaults_bound_memory_and_leave_the_cores_to_torch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loaders.default_batch_size(cpu) == 8 and loaders.default_batch_size(cuda) == 64
    monkeypatch.setattr(loaders.os, "cpu_count", lambda: 2)
    assert loaders.default_workers(cpu, 1, 8) == 0          # one photo: no worker process to start
    assert loaders.default_workers(cpu, 8, 8) == 0          # one batch
    assert loaders.default_workers(cpu, 9, 8) == 1
    assert loaders.default_workers(cuda, 1000, 64) == 2
    monkeypatch.setattr(loaders.os, "cpu_count", lambda: 16)
    assert loaders.default_workers(cpu, 1000, 8) == 4
    assert loaders.default_workers(cuda, 1000, 64) == 8


@pytest.mark.slow
@pytest.mark.subprocess
def test_cpu_scoring_bench_quick_mode_reports_both_sides(tmp_path):
    out = tmp_path / "cpu.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.cpu_scoring", "--quick", "--data", str(tmp_path / "data"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "import torch, torchvision" in proc.stdout
    import json
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["photos"] for r in rows] == [1]
    for r in rows:
        for side in ("test_py", "reference"):
            assert r[f"{side}_wall_s"] > 0 and r[f"{side}_cpu_s"] > 0 and r[f"{side}_peak_pss_mb"] > 0


def test_the_scorer_takes_the_cpu_default_batch(tmp_path):
    from engine.runtime import Runtime
    from engine.score.scorer import Scorer
    from model import build_model, default_model_args
    args = dict(default_model_args("tiny_cnn"), image_size=32, resize_size=40)
    scorer = Scorer(build_model(args).eval(), args, Runtime(torch.device("cpu"), show_progress=False))
    assert scorer.batch_size == loaders.default_batch_size(torch.device("cpu")) == 8
