"""End to end: a real Mosquitto, the aggregator and agent processes on loopback, real training.

One federation (module-scoped) of two hospitals plus `mallory`, a participant played by the test itself
over the same broker and HTTP API, who sends every kind of bad update the aggregator must refuse.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from federation.jobs import JobSpec
from federation.messages import (
    EvalMetrics,
    UpdateEnvelope,
)
from federation.models import build_model, get_weights
from federation.tensors import encode, sha256_hex
from fedsilo.client import ApiError
from fedsilo.datasets import SYNTHETIC_SCHEMA, split_by_center, synthetic_tabular
from fedsilo.local import LocalFederation, example_policy
from tests.participants import Mallory, post_update
from tests.waiting import wait_round

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


def job_yaml(**overrides: Any) -> str:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(overrides)
    return yaml.safe_dump(data)


def policy_for(site: str, datasets: dict[str, Path]) -> dict[str, Any]:
    """The example policy with a lower noise floor and a larger ε allowance (short test jobs converge with
    little noise), and the synthetic dataset offered too."""
    policy = example_policy(site, {k: v for k, v in datasets.items() if k == "heart-disease"})
    policy["privacy"]["min_noise_multiplier"] = 0.05
    policy["privacy"]["max_epsilon_per_job"] = 1e4
    policy["privacy"]["budgets"]["heart-disease"]["epsilon"] = 1e5
    policy["privacy"]["budgets"]["synthetic"] = {"epsilon": 1e5}
    policy["operations"]["max_concurrent_jobs"] = 3
    if "synthetic" in datasets:
        policy["datasets"]["synthetic"] = {
            "path": str(datasets["synthetic"]), "allowed_columns": SYNTHETIC_SCHEMA.columns(), "target": "label",
            "allowed_purposes": ["research"],
        }
    return policy


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("fed")
    files = split_by_center(root / "data")
    policies: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(("cleveland", "hungary")):
        synthetic = root / "data" / f"synthetic-{s}.csv"
        synthetic_tabular(400, seed=i, shift=0.3 * i).to_csv(synthetic, index=False)
        policies[s] = policy_for(s, {"heart-disease": files[s], "synthetic": synthetic})
    # A site whose data file is gone.
    policies["switzerland"] = policy_for("switzerland", {"heart-disease": root / "data" / "missing.csv"})
    with LocalFederation(root, policies, extra_identities=("mallory", "eve"), heartbeat_s=1.0) as f:
        yield f


def test_invalid_job_is_refused_with_every_bad_field(fed: LocalFederation) -> None:
    with pytest.raises(ApiError) as exc:
        fed.client.submit(job_yaml(rounds=-1, min_sites=0, model={"name": "resnet"}))
    assert exc.value.status == 400
    fields = {e["field"] for e in exc.value.body["errors"]}
    assert {"rounds", "min_sites", "model.name"} <= fields
    with pytest.raises(ApiError) as exc:
        fed.client.request("POST", "/api/v1/jobs", b"{not: [valid", "application/yaml")
    assert exc.value.status == 400


def test_job_converges_and_writes_its_report(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(
        rounds=4, sites=["cleveland", "hungary", "switzerland"], min_sites=2,
        privacy={"clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5},
    ))
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    # The site whose data file is missing refused with that reason and stayed up.
    sw = summary["sites"]["switzerland"]
    assert sw["decision"] == "refused" and "does not exist" in sw["reasons"][0]
    assert fed.agents["switzerland"].poll() is None
    # Converged well beyond a trivial model, with every round evaluated by both training sites.
    history = summary["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
    assert all(set(h["sites"]) == {"cleveland", "hungary"} for h in history)
    assert history[-1]["global"]["auc"] > 0.8
    assert history[-1]["global"]["auc"] > history[0]["global"]["auc"]
    for s in ("cleveland", "hungary"):
        assert summary["sites"][s]["epsilon"] > 0
    report = fed.report_dir / job_id
    for name in ("metrics.json", "metrics.csv", "metrics.png", "model.safetensors"):
        assert (report / name).stat().st_size > 0
    assert (report / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # Every log line of a site's round work carries job, round and site.
    text = fed.log("agent-cleveland").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    trained = [entry for entry in lines if entry.get("event") == "round_trained" and entry.get("job") == job_id]
    assert len(trained) == 4 and all(entry["site"] == "cleveland" and entry["round"] >= 1 for entry in trained)
    # The agent's own status endpoint: alive, ready, and counting its work for Prometheus.
    base = f"http://127.0.0.1:{fed.status_ports['cleveland']}"
    assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
    agent_metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert re.search(r"^fedsilo_agent_rounds_trained_total [4-9]", agent_metrics, re.M)
    assert 'fedsilo_agent_job_decisions_total{decision="accepted"}' in agent_metrics
    # State, audit logs, blobs, reports and process logs are the hospital's and the operator's: owner-only.
    written = [p for d in (fed.workdir / "state", fed.report_dir, fed.workspace.logs_dir) for p in d.rglob("*")]
    assert len(written) > 10
    assert not [p for p in written if p.stat().st_mode & 0o077], "readable beyond their owner"


def envelope(job_id: str, rnd: int, body: bytes, site: str = "mallory") -> UpdateEnvelope:
    return UpdateEnvelope(job_id=job_id, round=rnd, site=site, num_samples=50, sha256=sha256_hex(body),
                          evaluation=EvalMetrics(n=30, loss=0.7, auc=0.5), train_loss=0.7, epsilon=1.0)


def test_bad_updates_are_rejected_with_reasons_and_never_aggregated(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(
        rounds=2, sites=["cleveland", "hungary", "mallory"], min_sites=2, round_deadline_s=8,
        privacy={"clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5},
    ))
    template = get_weights(build_model("logreg", 25))
    good = encode({k: np.full_like(v, 0.01) for k, v in template.items()})

    async def play() -> dict[str, tuple[int, dict[str, Any]]]:
        mallory = Mallory(fed)
        link = await mallory.join(job_id)
        await mallory.wait_task(1)
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        nan = encode({**template, "0.bias": np.array([np.nan], np.float32)})
        shape = encode({**template, "0.weight": np.zeros((1, 3), np.float32)})
        calls = {
            "nan": ("mallory", envelope(job_id, 1, nan), nan),
            "shape": ("mallory", envelope(job_id, 1, shape), shape),
            "hash": ("mallory", envelope(job_id, 1, good).model_copy(update={"sha256": "a" * 64}), good),
            "garbage": ("mallory", envelope(job_id, 1, b"\x00garbage"), b"\x00garbage"),
            "future_round": ("mallory", envelope(job_id, 5, good), good),
            "unknown_job": ("mallory", envelope("no-such-job", 1, good), good),
            "impersonation": ("mallory", envelope(job_id, 1, good, site="cleveland"), good),
            "outsider": ("eve", envelope(job_id, 1, good, site="eve"), good),
            "good": ("mallory", envelope(job_id, 1, good), good),
            "retry": ("mallory", envelope(job_id, 1, good), good),
            "conflict": ("mallory", envelope(job_id, 1, encode(template)), encode(template)),
        }
        for name, (site, env, body) in calls.items():
            out[name] = await asyncio.to_thread(post_update, fed, site, env, body)
        await mallory.wait_task(2)  # round 1 closed with all three sites; mallory now stays silent
        await mallory.wait_task(3)  # round 2 closed at its deadline with the two hospitals
        out["late"] = await asyncio.to_thread(post_update, fed, "mallory", envelope(job_id, 2, good), good)
        await link.stop()
        return out

    out = asyncio.run(play())
    expected = {
        "nan": (400, "non_finite"), "shape": (400, "wrong_layout"), "hash": (400, "hash_mismatch"),
        "garbage": (400, "malformed_payload"), "future_round": (409, "round_not_open"),
        "unknown_job": (404, "unknown_job"), "impersonation": (403, "identity_mismatch"),
        "outsider": (403, "site_not_in_job"), "conflict": (409, "duplicate_conflict"), "late": (409, "late_update"),
    }
    for name, (status, code) in expected.items():
        assert out[name][0] == status and out[name][1]["error"] == code, (name, out[name])
        assert out[name][1]["detail"]
    assert out["good"] == (200, {"status": "accepted", "job_id": job_id, "round": 1})
    assert out["retry"][1]["status"] == "duplicate"

    summary = fed.wait_job(job_id, timeout=60)
    assert summary["state"] == "finished", summary["reason"]
    r1, r2 = summary["history"][1], summary["history"][2]
    assert r1["sites_reporting"] == 3 and r2["sites_reporting"] == 2  # round 2 closed at the deadline
    reasons = {r["reason"] for r in summary["rejections"]}
    assert {"non_finite", "wrong_layout", "hash_mismatch", "late_update", "duplicate_conflict"} <= reasons
    metrics = fed.client.request("GET", "/metrics").decode()
    assert 'fedsilo_updates_rejected_total{reason="non_finite",site="mallory"} 1.0' in metrics


def test_job_that_cannot_reach_quorum_fails_with_a_reason(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(rounds=1, sites=["cleveland", "switzerland"], min_sites=2))
    summary = fed.wait_job(job_id, timeout=60)
    assert summary["state"] == "failed"
    assert "only 1 of 2 sites accepted" in summary["reason"] and "does not exist" in summary["reason"]


def test_broker_restart_mid_job_and_the_job_still_finishes(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(
        rounds=6, sites=["cleveland", "hungary"], min_sites=2, round_deadline_s=30,
        privacy={"clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5},
    ))
    wait_round(fed, job_id, 2)
    fed.broker.restart()
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert len([h for h in summary["history"] if h["global"]]) == 7


def test_aggregator_restart_mid_job_resumes(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(
        rounds=5, sites=["cleveland", "hungary"], min_sites=2, round_deadline_s=30,
        privacy={"clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5},
    ))
    wait_round(fed, job_id, 2)
    fed.stop_aggregator(kill=True)
    fed.start_aggregator()
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert [h["round"] for h in summary["history"]] == list(range(6))
    assert all(h["sites_reporting"] == 2 for h in summary["history"][1:])


def test_a_job_on_another_tabular_schema(fed: LocalFederation) -> None:
    """Nothing in agent or aggregator knows heart disease: a different schema, target rule and model work."""
    job = {
        "name": "synthetic-mlp", "dataset": {"name": "synthetic"},
        "features": SYNTHETIC_SCHEMA.model_dump(mode="json"),
        "model": {"name": "mlp", "hidden": [16]},
        "hyperparameters": {"epochs": 3, "learning_rate": 0.05, "optimizer": "adam", "batch_size": 32},
        "privacy": {"clip_norm": 1.0, "noise_multiplier": 0.05},
        "rounds": 3, "sites": ["cleveland", "hungary"], "min_sites": 2,
    }
    job_id = fed.client.submit(yaml.safe_dump(job))
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    final = summary["history"][-1]
    assert set(final["sites"]) == {"cleveland", "hungary"}
    assert final["global"]["auc"] > 0.75


def test_agent_killed_mid_job_rejoins_and_the_job_finishes(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(
        rounds=6, sites=["cleveland", "hungary"], min_sites=2, round_deadline_s=30,
        privacy={"clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5},
    ))
    wait_round(fed, job_id, 2)
    fed.stop_agent("cleveland", kill=True)
    fed.start_agent("cleveland")
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert all(h["sites_reporting"] == 2 for h in summary["history"][1:])
    # The restarted agent kept its ledger: ε reflects all six rounds, not only those after the restart.
    from federation.privacy import epsilon_for

    assert summary["sites"]["cleveland"]["epsilon"] == pytest.approx(epsilon_for(0.1, 6, 1e-5), rel=1e-6)


def test_a_per_patient_job_runs_dpsgd_alone_and_every_report_says_its_unit(fed: LocalFederation) -> None:
    from agent.data import load_site_data
    from agent.record_plan import record_plan

    text = job_yaml(rounds=2, sites=["cleveland", "hungary"], min_sites=2)  # the example: ε ≤ 1 per patient
    job_id = fed.client.submit(text)
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert summary["privacy"] == {"unit": "record", "unit_words": "per patient record", "delta": 1e-5}
    spec = JobSpec.from_yaml(text)
    metrics = fed.client.request("GET", "/metrics").decode()
    for site in ("cleveland", "hungary"):
        # Each site calibrated its own DP-SGD σ for its own records and reported the ε of its plan, per patient.
        policy = yaml.safe_load((fed.workdir / "config" / f"policy-{site}.yaml").read_text())
        data = load_site_data(Path(policy["datasets"]["heart-disease"]["path"]), spec.features, spec.dataset)
        per_patient = record_plan(spec, data.n_train).epsilon(2)
        s = summary["sites"][site]
        assert s["epsilon_unit"] == "record" and s["epsilon"] == pytest.approx(per_patient)
        assert s["epsilon_by_unit"] == {"record": pytest.approx(per_patient)} and per_patient <= 1.0
        assert re.search(rf'fedsilo_site_epsilon{{job="{job_id}",site="{site}",unit="record"}} ', metrics)
    assert summary["history"][-1]["global"]["auc"] > 0.6
    html = (fed.report_dir / job_id / "report.html").read_text()
    assert "ε per patient record (δ=1e-05)" in html
    # The site unit is not charged by a record-level job: the agents' per-site ledgers are untouched by it.
    base = f"http://127.0.0.1:{fed.status_ports['cleveland']}"
    agent_metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert re.search(r'^fedsilo_agent_epsilon_spent\{dataset="heart-disease",unit="record"\} [0-9.]+', agent_metrics,
                     re.M)


def test_metrics_pass_promtool_on_the_aggregator_and_an_agent(fed: LocalFederation) -> None:
    """Both /metrics endpoints follow Prometheus' exposition format and naming conventions (`promtool check
    metrics` exits non-zero on any problem and names it)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make install-test` (Debian package prometheus)"
    base = f"http://127.0.0.1:{fed.status_ports['cleveland']}"
    texts = {
        "aggregator": fed.client.request("GET", "/metrics"),
        "agent": urllib.request.urlopen(base + "/metrics", timeout=5).read(),
    }
    for name, text in texts.items():
        assert b"fedsilo_" in text, name
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert out.returncode == 0, (name, out.stdout.decode() + out.stderr.decode())
