"""The scale benchmark runs to its table against a real aggregator (a small case: numbers are for bench/, never
asserted here). A change to what a valid update is must not leave the benchmark broken until someone runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_scale_benchmark_runs_to_its_table() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "scale", "--sites", "5", "--params", "1000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = [line.split() for line in out.stdout.splitlines() if line.split()[:2] == ["5", "1,000"]]
    assert len(row) == 12  # every column, the cancel latency included
    assert float(row[3]) > 0 and float(row[-1]) >= 0
