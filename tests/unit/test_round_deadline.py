"""A round that finishes after its deadline is not released and not charged: the deadline is checked inside the
privacy engine before the ledger is written, and local training itself stops at the deadline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.dpsgd import train_dpsgd
from agent.privacy import PrivacyEngine, RoundLateError
from agent.privacy_policy import BudgetPolicy, SitePrivacy
from agent.record_plan import record_plan
from agent.state import AgentState
from agent.trainer import TrainingStoppedError, train_local
from federation.jobs import JobSpec
from federation.messages import EvalMetrics
from federation.models import build_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
RECORD_SPEC = JobSpec.from_yaml(EXAMPLE.read_text())
SPEC = JobSpec.model_validate({**yaml.safe_load(EXAMPLE.read_text()),
                               "privacy": {"clip_norm": 0.3, "noise_multiplier": 0.4, "delta": 1e-5}})
PLAN = SitePrivacy(("site",), None, 0.4, 0.3, 1e-5)
DELTA = {"0.weight": np.full((1, 25), 0.1, np.float32), "0.bias": np.full((1,), 0.1, np.float32)}


def test_a_late_round_is_neither_released_nor_charged(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")
    engine = PrivacyEngine(state)
    args = ("cleveland", "job-1", 1, SPEC, PLAN, DELTA, 200, EvalMetrics(n=50, loss=0.6), 0.5)
    with pytest.raises(RoundLateError, match="after its deadline: its update was not released and no ε was charged"):
        engine.privatize(*args, budget=BudgetPolicy(epsilon=100.0), release_by=time.time() - 1)
    assert state.release("job-1", 1) is None and engine.pending("job-1", 1) is None
    assert state.spent("heart-disease", "site") == 0.0 and state.job_spend("job-1") == {}
    on_time = engine.privatize(*args, budget=BudgetPolicy(epsilon=100.0), release_by=time.time() + 60)
    assert state.spent("heart-disease", "site") == pytest.approx(on_time.envelope.epsilon)


def test_local_training_stops_at_the_deadline() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 25)).astype(np.float32), (rng.random(200) > 0.5).astype(np.float32)
    steps: list[int] = []

    def after_three() -> bool:
        steps.append(1)
        return len(steps) > 3

    with pytest.raises(TrainingStoppedError, match="stopped after 3 optimizer steps"):
        train_local(build_model("logreg", 25), x, y, SPEC.hyperparameters.model_copy(update={"batch_size": 1}),
                    seed=0, should_stop=after_three)
    plan = record_plan(RECORD_SPEC, 200)
    with pytest.raises(TrainingStoppedError, match=f"stopped after 0 of {plan.steps_per_round} DP-SGD steps"):
        train_dpsgd(build_model("logreg", 25), x, y, RECORD_SPEC, plan, should_stop=lambda: True)
