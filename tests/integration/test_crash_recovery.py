"""Crash safety: the aggregator is killed over and over during a multi-round job — at random moments and at
the worst ones (mid-ingest, mid-finalize) — plus an agent kill and a broker restart. The job must finish
with every acknowledged update counted exactly once and the finished-round count never going backwards.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from federation.faults import EXIT_CODE
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SITES = ("cleveland", "hungary", "va-long-beach")
ROUNDS = 30
FAILPOINTS = ("ingest_after_blob", "ingest_after_commit", "finalize_after_blob", "finalize_after_commit")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("crash")
    files = split_by_center(root / "data")
    policies = {s: example_policy(s, {"heart-disease": files[s]}) for s in SITES}
    with LocalFederation(root, policies, heartbeat_s=1.0) as f:
        yield f


def closed_rounds(fed: LocalFederation, job_id: str) -> int:
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        row = db.execute("SELECT COUNT(*) FROM rounds WHERE job_id=? AND state='closed' AND kind='train'",
                         (job_id,)).fetchone()
        return int(row[0])
    finally:
        db.close()


def job_state(fed: LocalFederation, job_id: str) -> tuple[str, str | None]:
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        state, reason = db.execute("SELECT state, reason FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return str(state), reason
    finally:
        db.close()


def acknowledged(fed: LocalFederation, job_id: str) -> set[tuple[str, int]]:
    """(site, round) of every update an agent logged as acknowledged by the aggregator."""
    out = set()
    for site in SITES:
        for line in fed.log(f"agent-{site}").read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "update_sent" and entry.get("job") == job_id:
                    out.add((site, int(entry["round"])))
    return out


def replay(fed: LocalFederation, job_id: str) -> None:
    """Recompute every round's global model from the stored updates and compare with the stored models:
    an update counted twice, or one acknowledged but lost, would make them differ."""
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    blobs = fed.workdir / "state" / "blobs"

    def load(sha: str) -> dict[str, np.ndarray]:
        return decode((blobs / sha[:2] / sha).read_bytes())

    rounds = db.execute("SELECT round, model_in, model_out FROM rounds WHERE job_id=? AND kind='train' "
                        "ORDER BY round", (job_id,)).fetchall()
    assert [r[0] for r in rounds] == list(range(1, ROUNDS + 1))
    for rnd, model_in, model_out in rounds:
        ups = db.execute("SELECT sha256, num_samples FROM updates WHERE job_id=? AND round=?", (job_id, rnd)).fetchall()
        assert len(ups) == len(SITES), (rnd, ups)
        start, total = load(model_in), sum(n for _, n in ups)
        expected = {k: start[k].astype(np.float64) + sum(n * load(sha)[k] for sha, n in ups) / total for k in start}
        stored = load(model_out)
        for k in start:
            np.testing.assert_allclose(stored[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=f"round {rnd}")
    db.close()


def test_aggregator_killed_ten_times_mid_job_loses_nothing(fed: LocalFederation) -> None:
    rng = random.Random(7)
    job = yaml.safe_load(EXAMPLE.read_text())
    job.update(sites=list(SITES), min_sites=3, rounds=ROUNDS, round_deadline_s=120)
    job["hyperparameters"]["epochs"] = 1
    job["privacy"]["noise_multiplier"] = 0.8  # ε ≈ 55 over 30 rounds: within the example policies' per-job cap
    job_id = fed.client.submit(yaml.safe_dump(job))
    seen: list[int] = []
    kills: list[str] = []
    fired: set[str] = set()  # failpoints the aggregator actually died at
    while len(kills) < 12 and closed_rounds(fed, job_id) < ROUNDS - 1:
        state, reason = job_state(fed, job_id)
        assert state in ("offered", "running", "paused"), f"job {state}: {reason}"
        mode = FAILPOINTS[len(kills) % len(FAILPOINTS)] if len(kills) < 8 else "random"
        fed.stop_aggregator(kill=True)
        if mode == "random":
            fed.start_aggregator()
            time.sleep(rng.uniform(0.05, 0.6))
            assert fed.aggregator is not None and fed.aggregator.poll() is None
        else:
            fed.start_aggregator(env={"FEDSILO_FAILPOINT": f"{mode}:{rng.randint(1, 2)}"}, wait=False)
            assert fed.aggregator is not None
            try:
                code = fed.aggregator.wait(timeout=60)
            except subprocess.TimeoutExpired:  # not reached this time: the next kill is an ordinary SIGKILL
                code = -9
            assert code in (EXIT_CODE, -9), code
            if code == EXIT_CODE:
                fired.add(mode)
        kills.append(mode)
        seen.append(closed_rounds(fed, job_id))
        if len(kills) == 5:
            fed.stop_agent("hungary", kill=True)  # an agent dies mid-round too
            fed.start_agent("hungary")
        if len(kills) == 7:
            fed.broker.restart()
    fed.stop_aggregator(kill=True)
    fed.start_aggregator()
    summary: dict[str, Any] = fed.wait_job(job_id, timeout=300)
    assert summary["state"] == "finished", summary["reason"]
    assert len(kills) >= 10, kills
    assert fired == set(FAILPOINTS), f"failpoints never reached: {set(FAILPOINTS) - fired}"
    assert seen == sorted(seen), seen  # finished rounds never go backwards
    assert closed_rounds(fed, job_id) == ROUNDS
    history = summary["history"]
    assert all(h["sites_reporting"] == len(SITES) for h in history[1:])
    stored = {(site, t["round"]) for t in summary["training"] for site in t["sites"]}
    assert acknowledged(fed, job_id) <= stored  # no acknowledged update was lost
    replay(fed, job_id)  # and none was counted twice
