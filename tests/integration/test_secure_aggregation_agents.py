"""Secure aggregation end to end with the real agents: four hospitals' agent processes, the aggregator, Mosquitto and
mutual TLS, real training. The job finishes; what the aggregator stored of each site's update is indistinguishable
from uniform mod 2^32; every site charged each round once, with ε alone beside the sum's ε, and revealed once per
round; an agent that dies after releasing a round but before uploading it is a dropout of that round, which the
others' reveals close, and it takes part again once restarted."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats  # type: ignore[import-untyped]

from agent.config import AgentConfig
from federation.faults import EXIT_CODE
from federation.messages import UpdateEnvelope
from federation.secagg import masking
from federation.secagg.job import MASKED
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")


def policy_for(site: str, data: Path) -> dict[str, Any]:
    policy = example_policy(site, {"heart-disease": data})
    policy["privacy"]["max_epsilon_per_job"] = 1e4
    policy["privacy"]["budgets"]["heart-disease"]["epsilon"] = 1e5
    return policy


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("secure-agents")
    files = split_by_center(root / "data")
    with LocalFederation(root, {s: policy_for(s, files[s]) for s in SITES}, heartbeat_s=1.0) as f:
        yield f


def secure_job(rounds: int, deadline_s: float) -> str:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    job.update(rounds=rounds, round_deadline_s=deadline_s, secure_aggregation=True, aggregation="fedavg",
               model={"name": "mlp", "hidden": [32]})
    job["privacy"] = {"unit": "site", "clip_norm": 0.5, "noise_multiplier": 0.5, "delta": 1e-5}
    return yaml.safe_dump(job)


def aggregator_db(fed: LocalFederation, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def agent_db(fed: LocalFederation, site: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(AgentConfig.load(fed.agent_config(site)).state_dir / "agent.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def masked_uploads(fed: LocalFederation, job_id: str) -> dict[tuple[int, str], np.ndarray]:
    rows = aggregator_db(fed, "SELECT round, site, sha256 FROM updates WHERE job_id=?", job_id)
    blobs = fed.workdir / "state" / "blobs"
    return {(rnd, site): decode((blobs / sha[:2] / sha).read_bytes())[MASKED] for rnd, site, sha in rows}


def uniform_p(values: np.ndarray) -> float:
    """Chi-square p-value of the top 4 bits of values mod 2^32 against uniform."""
    counts = np.bincount((values >> (masking.MODULUS_BITS - 4)).astype(np.int64), minlength=16)
    return float(stats.chisquare(counts).pvalue)


def test_a_secure_job_runs_end_to_end_and_the_aggregator_sees_only_uniform_vectors(fed: LocalFederation) -> None:
    rounds = 3
    job_id = fed.client.submit(secure_job(rounds, deadline_s=40))
    summary = fed.wait_job(job_id, timeout=300)
    assert summary["state"] == "finished", summary["reason"]
    assert {h["round"]: h["sites_reporting"] for h in summary["history"] if 1 <= h["round"] <= rounds} == \
        {r: len(SITES) for r in range(1, rounds + 1)}
    uploads = masked_uploads(fed, job_id)
    assert sorted(uploads) == sorted((r, s) for r in range(1, rounds + 1) for s in SITES)
    dim = next(iter(uploads.values())).size
    assert dim == 25 * 32 + 32 + 32 + 1
    everything = np.concatenate(list(uploads.values()))
    assert everything.min() >= 0 and everything.max() < masking.MODULUS
    assert uniform_p(everything) > 1e-4
    # The same test finds a quantized update that is not masked (small integers mod 2^32: top bits 0 or 15).
    assert uniform_p(np.mod(np.round(np.random.default_rng(0).normal(0, 1e6, everything.size)).astype(np.int64),
                            masking.MODULUS)) < 1e-4
    for site in SITES:
        released = agent_db(fed, site, "SELECT round, sent, envelope FROM releases WHERE job_id=? ORDER BY round",
                            job_id)
        assert [(r, s) for r, s, _ in released] == [(r, 1) for r in range(1, rounds + 1)]
        for _, _, env in released:
            spend = next(u for u in UpdateEnvelope.model_validate_json(env).privacy if u.unit == "site")
            assert spend.epsilon is not None and spend.epsilon_alone is not None
            assert spend.epsilon_alone > spend.epsilon
        assert [r for (r,) in agent_db(fed, site, "SELECT round FROM reveals WHERE job_id=? ORDER BY round",
                                       job_id)] == list(range(1, rounds + 1))
        assert agent_db(fed, site, "SELECT COUNT(*) FROM spend WHERE job_id=? AND unit='site'", job_id) == [(rounds,)]
        audit = (AgentConfig.load(fed.agent_config(site)).state_dir / "audit.log").read_text()
        assert "secagg_reveal_refused" not in audit and "secagg_share_refused" not in audit


def test_an_agent_dying_between_release_and_upload_is_a_dropout_and_rejoins(fed: LocalFederation) -> None:
    rounds, victim = 3, "va-long-beach"
    fed.stop_agent(victim)
    fed.start_agent(victim, env={"FEDSILO_FAILPOINT": "released_before_upload:2"})
    fed.wait_sites_online([victim])
    job_id = fed.client.submit(secure_job(rounds, deadline_s=25))
    wait_for(lambda: fed.agents[victim].poll() is not None, 200, f"{victim} reaching its failpoint in round 2")
    assert fed.agents[victim].returncode == EXIT_CODE
    # Back (without the failpoint) once round 2 closed without it: back sooner, it would resend its released bytes
    # and be a survivor after all (its shares are in; the mask secrets it lost are not needed for that).
    wait_for(lambda: aggregator_db(fed, "SELECT state FROM rounds WHERE job_id=? AND round=2", job_id)
             == [("closed",)], 120, "round 2 closing without the victim")
    fed.start_agent(victim)
    summary = fed.wait_job(job_id, timeout=300)
    assert summary["state"] == "finished", summary["reason"]
    reporting = {h["round"]: h["sites_reporting"] for h in summary["history"] if 1 <= h["round"] <= rounds}
    assert reporting[1] == len(SITES) and reporting[2] == len(SITES) - 1
    uploads = masked_uploads(fed, job_id)
    assert (2, victim) not in uploads and (1, victim) in uploads
    # Round 2 was released (and charged) before the crash, once: the restarted agent does not train it again.
    assert agent_db(fed, victim, "SELECT COUNT(*) FROM releases WHERE job_id=? AND round=2", job_id) == [(1,)]
    survivors_revealed = [s for s in SITES if s != victim
                          if agent_db(fed, s, "SELECT dropped FROM reveals WHERE job_id=? AND round=2", job_id)
                          == [(f'["{victim}"]',)]]
    assert len(survivors_revealed) == len(SITES) - 1
