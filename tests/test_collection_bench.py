"""bench/score_collection.py's quick mode: every run scores every image (no time is
asserted: the machine is shared)."""
import pytest
import json
import subprocess
import sys

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.subprocess
def test_score_collection_bench_quick_mode(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.score_collection", "--quick", "--data", str(tmp_path / "data"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["source"], r["processes"]) for r in rows] == [("folder", 1), ("folder", 1), ("shards", 2)]
    assert rows[0]["path"].startswith("in-memory") and all(r["path"] == "test.py" for r in rows[1:])
    for r in rows:
        assert r["images"] == 300 and r["shards"] == 3 and r["images_per_s"] > 0 and r["peak_pss_mb"] > 0
