"""The scale benchmark's secure-aggregation rows run to their table against a real aggregator, every simulated site
running the protocol (a small case: numbers are for bench/, never asserted here beyond their sign and what the
wire format fixes). A change to the protocol's messages must not leave the benchmark broken until someone runs it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale_secure import dropped_count, secure_job_for
from federation.jobs import JobSpec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["row", "blobs", "sites", "params", "t", "dropped", "share_s", "upload_s", "unmask_s", "round_s", "updates_s",
           "cpu_s", "rss", "bundle_kb", "masked_kb", "reveal_kb", "secure_kb", "plain_kb", "bundle_ms", "mask_ms",
           "reveal_ms", "cancel_s"]


def test_the_secure_rows_run_to_their_table_without_and_with_a_dropout() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "scale", "--secure", "--no-plain", "--sites", "5",
                          "--params", "1000"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fedsilo scale benchmark" not in out.stdout  # --no-plain: no plain table
    rows = [dict(zip(COLUMNS, line.split(), strict=True)) for line in out.stdout.splitlines()
            if line.split()[:2] == ["secure", "files"]]
    assert [(r["sites"], r["t"], r["dropped"]) for r in rows] == [("5", "3", "0"), ("5", "3", "1")]
    for r in rows:
        assert all(float(r[k]) >= 0 for k in ("share_s", "upload_s", "unmask_s", "cancel_s"))
        assert all(float(r[k]) > 0 for k in ("bundle_kb", "reveal_kb", "bundle_ms", "mask_ms", "reveal_ms"))
        # a masked upload is one int64 vector (8 bytes a parameter, a short header), a plain one float32 tensors
        params = int(r["params"].replace(",", ""))
        assert 0 <= float(r["masked_kb"]) - 8 * params / 1e3 < 0.2
        assert 0 <= float(r["plain_kb"]) - 4 * params / 1e3 < 0.5


@pytest.mark.parametrize("n", [3, 5, 20, 99, 100, 101, 1000])
def test_the_secure_job_freezes_the_unmask_request_at_the_last_upload_and_keeps_a_majority_threshold(n: int) -> None:
    names = [f"sim-{i:04d}" for i in range(n)]
    for dropout in (0.0, 0.05):
        dropped = dropped_count(n, dropout)
        spec = JobSpec.model_validate(secure_job_for(names, [4], dropped))
        assert spec.secagg_threshold == n // 2 + 1
        assert math.ceil(spec.quorum * n) == n - dropped  # the round's quorum: every site that uploads
