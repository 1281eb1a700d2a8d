"""Secure aggregation on a real federation: five agent processes (threshold 3), the broker and the aggregator.

The job finishes and what the aggregator stored of each site's update is indistinguishable from uniform mod 2^32;
every site charged each round once and revealed once. One and then two sites that die once their update is masked
are dropped and their masks removed, and they take part again once restarted; the aggregator killed at each new
step of the protocol resumes the round from the store; each site reports the ε of the sum and of its own noise
alone. A per-patient job with its noise in the secure sum takes the mean clipped-gradient step over every site's
records."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats  # type: ignore[import-untyped]

from agent.config import AgentConfig
from agent.data import load_site_data
from federation.faults import EXIT_CODE
from federation.jobs import JobSpec
from federation.messages import UpdateEnvelope
from federation.secagg import masking
from federation.secagg.job import MASKED
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
# Five agents (threshold 3), the fifth reading Hungary's file as a hospital of its own.
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach", "hungary-2")
AGGREGATOR_FAILPOINTS = ("secagg_after_shares", "secagg_after_roster", "secagg_after_unmask_request",
                         "secagg_after_reveal")
AGENT_FAILPOINT = "released_before_upload"  # the masked update is released (charged, logged), not yet uploaded


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("secagg-agents")
    files = split_by_center(root / "data")
    policies = {s: example_policy(s, {"heart-disease": files[s]}) for s in SITES[:4]}
    policies["hungary-2"] = {**example_policy("hungary", {"heart-disease": files["hungary"]}), "site": "hungary-2"}
    with LocalFederation(root, policies, heartbeat_s=1.0) as f:
        f.wait_sites_online(list(SITES))
        yield f


def secure_job(rounds: int, deadline_s: float, **extra: Any) -> str:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    job.update(sites=list(SITES), min_sites=3, rounds=rounds, round_deadline_s=deadline_s,
               secure_aggregation=True, **extra)
    job["privacy"] = {"unit": "site", "clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5}
    job["hyperparameters"].update(learning_rate=0.1, epochs=1)
    return yaml.safe_dump(job)


def db_rows(fed: LocalFederation, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def reporting(summary: dict[str, Any]) -> dict[int, int]:
    return {h["round"]: h["sites_reporting"] for h in summary["history"] if h["sites_reporting"] is not None}


def agent_db(fed: LocalFederation, site: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(AgentConfig.load(fed.agent_config(site)).state_dir / "agent.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def masked_uploads(fed: LocalFederation, job_id: str) -> dict[tuple[int, str], np.ndarray]:
    rows = db_rows(fed, "SELECT round, site, sha256 FROM updates WHERE job_id=?", job_id)
    blobs = fed.workdir / "state" / "blobs"
    return {(rnd, site): decode((blobs / sha[:2] / sha).read_bytes())[MASKED] for rnd, site, sha in rows}


def uniform_p(values: np.ndarray) -> float:
    """Chi-square p-value of the top 4 bits of values mod 2^32 against uniform."""
    counts = np.bincount((values >> (masking.MODULUS_BITS - 4)).astype(np.int64), minlength=16)
    return float(stats.chisquare(counts).pvalue)


def test_a_secure_job_runs_end_to_end_and_the_aggregator_sees_only_uniform_vectors(fed: LocalFederation) -> None:
    rounds = 3
    job_id = fed.client.submit(secure_job(rounds, deadline_s=40, model={"name": "mlp", "hidden": [32]}))
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


def round_closed(fed: LocalFederation, job_id: str, rnd: int) -> bool:
    return db_rows(fed, "SELECT state FROM rounds WHERE job_id=? AND round=?", job_id, rnd) == [("closed",)]


def test_one_then_two_sites_dying_after_masking_are_unmasked_around_and_rejoin(fed: LocalFederation) -> None:
    # Hungary dies in round 2 once its masked update is released, Switzerland and VA in round 3.
    dying = {"hungary": 2, "switzerland": 3, "va-long-beach": 3}
    for site, rnd in dying.items():
        fed.stop_agent(site)
        fed.start_agent(site, env={"FEDSILO_FAILPOINT": f"{AGENT_FAILPOINT}:{rnd}"})
    fed.wait_sites_online(list(SITES))
    job_id = fed.client.submit(secure_job(rounds=5, deadline_s=8))
    for rnd in (2, 3):
        for site in [s for s, r in dying.items() if r == rnd]:
            assert fed.agents[site].wait(timeout=120) == EXIT_CODE, f"{site} did not die at its failpoint"
        # Held after this round until the dead are back (sooner, one would resend its released bytes and survive
        # after all; later, it would miss the next round's roster).
        fed.client.pause(job_id)
        wait_for(lambda r=rnd: round_closed(fed, job_id, r), 60, f"round {rnd} closing")  # type: ignore[misc]
        for site in [s for s, r in dying.items() if r == rnd]:
            fed.start_agent(site)
        fed.wait_sites_online(list(SITES))
        fed.client.resume(job_id)
    summary = fed.wait_job(job_id, timeout=240)
    assert summary["state"] == "finished", summary["reason"]
    rounds = reporting(summary)
    assert rounds[1] == 5 and rounds[2] == 4 and rounds[3] == 3, rounds
    assert rounds[5] == 5, rounds  # the restarted sites take part again
    for site in SITES:
        eps = summary["sites"][site]["epsilon_by_unit"]
        assert 0 < eps["site"] < eps["site_alone"], (site, eps)  # the sum's noise, then one site's share alone


def test_the_aggregator_killed_at_each_step_of_the_protocol_resumes_the_round(fed: LocalFederation) -> None:
    job_id = fed.client.submit(secure_job(rounds=6, deadline_s=90))
    fired = set()
    for point in AGGREGATOR_FAILPOINTS:
        fed.stop_aggregator(kill=True)
        fed.start_aggregator(env={"FEDSILO_FAILPOINT": f"{point}:1"}, wait=False)
        assert fed.aggregator is not None
        try:
            code = fed.aggregator.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        if code == EXIT_CODE:
            fired.add(point)
        fed.stop_aggregator(kill=True)
        fed.start_aggregator()
        time.sleep(0.5)
    assert fired == set(AGGREGATOR_FAILPOINTS), f"never reached: {set(AGGREGATOR_FAILPOINTS) - fired}"
    summary = fed.wait_job(job_id, timeout=300)
    assert summary["state"] == "finished", summary["reason"]
    assert all(n == len(SITES) for n in reporting(summary).values()), reporting(summary)
    wait_for(lambda: db_rows(fed, "SELECT COUNT(*) FROM rounds WHERE job_id=? AND kind='train' AND state='closed'",
                             job_id) == [(6,)], 10, "six closed rounds")


def test_a_distributed_per_patient_job_steps_on_the_mean_clipped_gradient_of_every_sites_records(
    fed: LocalFederation, tmp_path: Path,
) -> None:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    lr, clip, b = 4.0, 0.5, 512
    job.update(sites=list(SITES), min_sites=3, rounds=1, round_deadline_s=60, secure_aggregation=True,
               hyperparameters={"epochs": 1, "learning_rate": lr, "batch_size": b},
               privacy={"unit": "record", "record_noise": "distributed", "target_epsilon": 1.0,
                        "record_clip_norm": clip, "clip_norm": 1.0, "delta": 1e-5})
    job_id = fed.client.submit(yaml.safe_dump(job))
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert reporting(summary)[1] == len(SITES), json.dumps(summary)
    assert summary["rejections"] == []  # the reveals past the threshold's are answered, not recorded as refusals
    model = decode(fed.client.request("GET", f"/api/v1/jobs/{job_id}/model"))
    # The step by hand from the sites' own files: at the all-zero start every record's gradient is
    # (1/2 − y)·[x, 1], clipped to 0.5; the step is −lr × their sum over all five sites' records.
    spec = JobSpec.model_validate(job)
    files = split_by_center(tmp_path)
    data = [load_site_data(files["hungary" if s == "hungary-2" else s], spec.features, spec.dataset) for s in SITES]
    grads = [(0.5 - d.y_train)[:, None] * np.hstack([d.x_train, np.ones((d.n_train, 1))]) for d in data]
    total = sum((g * np.minimum(1.0, clip / np.linalg.norm(g, axis=1))[:, None]).sum(axis=0) for g in grads)
    expected = -lr * total / sum(d.n_train for d in data)
    got = np.concatenate([model["0.weight"].ravel(), model["0.bias"].ravel()])
    # The sum's noise: σ·lr·clip/b per coordinate for three shares, over the records/b the aggregator divides by.
    sigma = spec.privacy.record_noise_multiplier
    assert sigma is not None
    noise_sd = sigma * lr * clip * np.sqrt(len(SITES) / 3) / sum(d.n_train for d in data)
    assert float(np.linalg.norm(expected)) > 20 * noise_sd  # the step stands far above the noise
    assert float(np.abs(got - expected).max()) < 6 * noise_sd, (got, expected, noise_sd)
    for site in SITES:
        [(env,)] = agent_db(fed, site, "SELECT envelope FROM releases WHERE job_id=?", job_id)
        [spend] = UpdateEnvelope.model_validate_json(env).privacy
        assert spend.unit == "record" and spend.noise_multiplier == sigma
        assert spend.epsilon is not None and 0.99 < spend.epsilon <= 1.0 and spend.epsilon_alone is not None
        assert spend.epsilon_alone > spend.epsilon
        assert summary["sites"][site]["epsilon_by_unit"] == {"record": spend.epsilon,
                                                             "record_alone": spend.epsilon_alone}
