"""bench/score_collection.py's quick mode, with --gpu_decode: every run scores every
image, test.py --gpu_decode (decoding on the CPU) under torchrun too (no time is asserted:
the machine is shared)."""
import pytest
import json
import subprocess
import sys

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.subprocess
def test_score_collection_bench_quick_mode(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.score_collection", "--quick", "--gpu_decode", "--data",
                           str(tmp_path / "data"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["source"], r["processes"], r["path"]) for r in rows] == [
        ("folder", 1, "test.py"), ("folder", 1, "test.py --gpu_decode"),
        ("shards", 2, "test.py"), ("shards", 2, "test.py --gpu_decode")]
    for r in rows:
        assert r["images"] == 60 and r["shards"] == 3 and r["images_per_s"] > 0 and r["peak_pss_mb"] > 0
