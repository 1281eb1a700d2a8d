"""The agent's send path: only the privacy engine makes releasable updates; it logs spend and bytes before
returning, never releases a round twice, never exceeds the budget; the egress gate sends nothing else, and
audits every refusal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.audit import AuditLog
from agent.egress import EgressGate, EgressRefusedError
from agent.policy import EgressPolicy
from agent.privacy import AlreadyReleasedError, BudgetExhaustedError, PrivacyEngine, PrivatizedUpdate
from agent.privacy_policy import BudgetPolicy, SitePrivacy
from agent.state import AgentState
from federation.jobs import JobSpec
from federation.messages import EvalMetrics, UpdateEnvelope
from federation.mqtt import MqttLink
from federation.privacy import epsilon_for
from federation.tensors import decode, l2_norm, sha256_hex
from federation.transport import BrokerConfig, TLSConfig
from fedsilo.certs import local_pki

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
# These tests exercise the site unit's send path (update-level noise); the record unit's is in test_record_dp.py.
SPEC = JobSpec.model_validate({**yaml.safe_load(EXAMPLE.read_text()),
                               "privacy": {"clip_norm": 0.3, "noise_multiplier": 0.4, "delta": 1e-5}})
PLAN = SitePrivacy(("site",), None, 0.4, 0.3, 1e-5)
EVAL = EvalMetrics(n=100, loss=0.6, auc=0.7)
BIG = BudgetPolicy(epsilon=1e9)


def budget(eps: float) -> BudgetPolicy:
    return BudgetPolicy(epsilon=eps)


def delta(scale: float = 10.0, n: int = 25) -> dict[str, np.ndarray]:
    return {"0.weight": np.full((1, n), scale, np.float32), "0.bias": np.full((1,), scale, np.float32)}


def test_release_is_clipped_noised_accounted_and_durable(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")
    engine = PrivacyEngine(state)
    up = engine.privatize("cleveland", "job-1", 1, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=BIG)
    p = SPEC.privacy
    noisy = decode(up.payload)
    assert up.envelope.sha256 == sha256_hex(up.payload)
    assert l2_norm(noisy) < l2_norm(delta()) / 10  # clipped to C, then noised with std σC per coordinate
    assert up.envelope.epsilon == pytest.approx(epsilon_for(p.noise_multiplier, 1, p.delta))
    state.close()
    # After a restart the same bytes are there to resend, and the spend is still counted.
    state2 = AgentState(tmp_path / "agent.db")
    engine2 = PrivacyEngine(state2)
    again = engine2.pending("job-1", 1)
    assert again is not None and again.payload == up.payload
    assert state2.job_spend("job-1") == {"site": pytest.approx(up.envelope.epsilon)}
    assert state2.spent("heart-disease", "site") == pytest.approx(up.envelope.epsilon)
    assert state2.spent("heart-disease", "record") == 0.0


def test_a_round_is_never_released_twice(tmp_path: Path) -> None:
    engine = PrivacyEngine(AgentState(tmp_path / "agent.db"))
    engine.privatize("cleveland", "job-1", 1, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=BIG)
    with pytest.raises(AlreadyReleasedError):
        engine.privatize("cleveland", "job-1", 1, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=BIG)
    second = engine.privatize("cleveland", "job-1", 2, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=BIG)
    assert second.envelope.epsilon == pytest.approx(epsilon_for(SPEC.privacy.noise_multiplier, 2, 1e-5))


def test_the_budget_is_never_exceeded_across_jobs(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")
    engine = PrivacyEngine(state)
    one_round = epsilon_for(SPEC.privacy.noise_multiplier, 1, 1e-5)
    two_rounds = epsilon_for(SPEC.privacy.noise_multiplier, 2, 1e-5)
    total = budget(one_round + two_rounds + 0.01)
    engine.privatize("cleveland", "job-a", 1, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=total)
    engine.privatize("cleveland", "job-b", 1, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=total)
    engine.privatize("cleveland", "job-b", 2, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=total)
    with pytest.raises(BudgetExhaustedError, match="past the budget"):
        engine.privatize("cleveland", "job-b", 3, SPEC, PLAN, delta(), 200, EVAL, 0.5, budget=total)
    assert state.release("job-b", 3) is None  # nothing was released or logged
    assert state.spent("heart-disease", "site") == pytest.approx(one_round + two_rounds)


def test_privatized_updates_cannot_be_forged() -> None:
    env = UpdateEnvelope(job_id="job-1", round=1, site="cleveland", num_samples=1, sha256="0" * 64,
                         evaluation=EVAL, train_loss=0.1, epsilon=1.0)
    with pytest.raises(TypeError, match="only made by"):
        PrivatizedUpdate(object(), "job-1", 1, b"raw", env)


@pytest.fixture
def tls(tmp_path: Path) -> TLSConfig:
    pki = local_pki(tmp_path / "pki", ["cleveland"])
    issued = pki.issued("site", "cleveland")
    return TLSConfig(ca_file=pki.ca_cert, cert_file=issued.cert, key_file=issued.key)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    yield AuditLog(tmp_path / "audit.log")


def attempt(tls: TLSConfig, audit: AuditLog, policy: EgressPolicy, send: Any, url: str = "https://127.0.0.1:1") -> str:
    """Run one send through a gate; return the refusal and check it was audited."""
    async def go() -> str:
        link = MqttLink("x", BrokerConfig(port=1), lambda t, p: None, [])
        gate = EgressGate("cleveland", url, tls, link, policy, audit)
        await gate.start()
        try:
            with pytest.raises(EgressRefusedError) as exc:
                await send(gate)
            return str(exc.value)
        finally:
            await gate.close()

    reason = asyncio.run(go())
    last = json.loads(audit.path.read_text().splitlines()[-1])
    assert last["event"] == "egress_refused" and last["reason"] == reason
    return reason


POLICY = EgressPolicy(allowed_endpoints=["127.0.0.1:1"], max_upload_bytes_per_round=4096,
                      allowed_metrics=["auc", "loss", "n"], min_records_per_metric=20)


def released(tmp_path: Path, n: int = 25, evaluation: EvalMetrics | None = EVAL) -> PrivatizedUpdate:
    engine = PrivacyEngine(AgentState(tmp_path / "engine.db"))
    return engine.privatize("cleveland", "job-1", 1, SPEC, PLAN, delta(n=n), 200, evaluation, 0.5, budget=BIG)


def test_gate_refuses_an_unprivatized_tensor(tls: TLSConfig, audit: AuditLog) -> None:
    reason = attempt(tls, audit, POLICY, lambda g: g.send_update(b"raw tensor bytes"))
    assert "only privatized updates" in reason


def test_gate_refuses_an_endpoint_not_on_the_allowlist(tls: TLSConfig, audit: AuditLog, tmp_path: Path) -> None:
    update = released(tmp_path)
    reason = attempt(tls, audit, POLICY, lambda g: g.send_update(update), url="https://exfil.example:443")
    assert "exfil.example:443 is not on the egress allowlist" in reason


def test_gate_refuses_an_oversized_payload(tls: TLSConfig, audit: AuditLog, tmp_path: Path) -> None:
    update = released(tmp_path, n=5000)
    reason = attempt(tls, audit, POLICY, lambda g: g.send_update(update))
    assert "exceeds the 4096-byte limit" in reason


def test_gate_refuses_metrics_the_policy_does_not_allow(tls: TLSConfig, audit: AuditLog, tmp_path: Path) -> None:
    no_auc = POLICY.model_copy(update={"allowed_metrics": ["loss"]})
    update = released(tmp_path)
    assert "['auc'] are not allowed" in attempt(tls, audit, no_auc, lambda g: g.send_update(update))
    few = released(tmp_path / "few", evaluation=EvalMetrics(n=5, loss=0.3, auc=0.9))
    assert "over 5 records" in attempt(tls, audit, POLICY, lambda g: g.send_update(few))

    async def raw_column(g: EgressGate) -> None:  # a "metric" that is really a column of patient data
        g.check_metric_names(["age"], "job-1")

    assert "['age'] are not allowed" in attempt(tls, audit, POLICY, raw_column)
