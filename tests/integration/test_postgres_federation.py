"""The production store end to end: the aggregator keeps its state in PostgreSQL (a private server the tests
start), is killed mid-job and resumes from PostgreSQL, and the job finishes with every round in the database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation
from tests.integration.test_federation import policy_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
ROUNDS = 6


@pytest.fixture
def fed(tmp_path: Path, postgres_url: str) -> Iterator[LocalFederation]:
    files = split_by_center(tmp_path / "data")
    policies = {s: policy_for(s, {"heart-disease": files[s]}) for s in ("cleveland", "hungary")}
    with LocalFederation(tmp_path, policies, heartbeat_s=1.0, aggregator_extra={"state_url": postgres_url}) as f:
        f.wait_sites_online(["cleveland", "hungary"])
        yield f


def closed_rounds(url: str, job_id: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM rounds WHERE job_id=%s AND state='closed' AND kind='train'",
                           (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_job_survives_an_aggregator_kill_with_its_state_in_postgresql(
    fed: LocalFederation, postgres_url: str
) -> None:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    job.update(sites=["cleveland", "hungary"], min_sites=2, rounds=ROUNDS, round_deadline_s=60)
    job["privacy"].update(clip_norm=1.0, noise_multiplier=0.1)
    job_id = fed.client.submit(yaml.safe_dump(job))
    deadline = time.monotonic() + 60
    while closed_rounds(postgres_url, job_id) < 2:
        assert time.monotonic() < deadline, "no round closed in PostgreSQL"
        time.sleep(0.05)
    fed.stop_aggregator(kill=True)
    fed.start_aggregator()
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert closed_rounds(postgres_url, job_id) == ROUNDS
    assert [h["round"] for h in summary["history"]] == list(range(ROUNDS + 1))
    assert not (fed.workdir / "state" / "aggregator.db").exists()  # nothing went to the default SQLite file
