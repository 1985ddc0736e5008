"""The benchmark stays runnable: a quick smoke in CI (speed targets live in the benchmark)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ultralytics")

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["case"].startswith("quick") and row["median_s"] > 0 and row["ratio"] > 0.5
    assert 10_000 < row["bytes_per_image"] < 5_000_000  # 22 stage grids + statistics
    assert data["meta"]["cpus"] >= 1
    assert "quick: yolov8n 320" in proc.stdout
