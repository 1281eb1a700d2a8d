"""Per patient with the noise in the secure sum (`privacy.record_noise: distributed`): the job resolves one σ for
every site, one record's scaled gradient sizes the noise, a site steps on its records' clipped gradients without
noise of its own, adds its share only under the mask (never in the clear), reports ε per patient, and a policy that
requires the site unit or a higher noise floor refuses the job with its reason."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from agent import dpsgd
from agent.daemon import load_data
from agent.data import load_site_data
from agent.dpsgd import clipped_gradient_step
from agent.policy import SitePolicy, evaluate
from agent.privacy import PrivacyEngine
from agent.privacy_policy import BudgetPolicy, plan_privacy
from agent.state import AgentState
from agent.trainer import TrainingStoppedError
from federation.jobs import JobSpec
from federation.messages import EvalMetrics
from federation.models import build_model, get_weights, set_weights
from federation.privacy import epsilon_for
from federation.secagg import quantize
from federation.secagg.errors import SecAggError
from federation.secagg.job import divisor, job_quantization, record_step_norm, weights
from federation.secagg.masking import to_signed
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from tests.example_policies import site_policy

ROOT = Path(__file__).resolve().parents[2]
JOB: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text())
DIM = 25 + 1  # the example's logistic regression: 25 encoded inputs and a bias
PRIVACY = {"unit": "record", "record_noise": "distributed", "target_epsilon": 1.0, "record_clip_norm": 0.5,
           "clip_norm": 1.0, "delta": 1e-5}


def distributed(**change: Any) -> dict[str, Any]:
    job = {**JOB, "rounds": 20, "min_sites": 4, "secure_aggregation": {"threshold": 4},
           "hyperparameters": {"epochs": 1, "learning_rate": 4.0, "batch_size": 512}, "privacy": dict(PRIVACY)}
    for key, value in change.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) and isinstance(job.get(key), dict) else value
    return job


SPEC = JobSpec.model_validate(distributed())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_by_center(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize(("change", "words"), [
    ({"secure_aggregation": None}, "needs secure_aggregation"),
    ({"hyperparameters": {"optimizer": "adam"}}, "optimizer sgd"),
    ({"hyperparameters": {"epochs": 5}}, "epochs and max_steps do not apply"),
    ({"hyperparameters": {"max_steps": 3}}, "epochs and max_steps do not apply"),
    ({"hyperparameters": {"momentum": 0.9}}, "no momentum"),
    ({"hyperparameters": {"weight_decay": 0.01}}, "no weight decay"),
    ({"trainer": "fedml-logreg"}, "no registered trainer"),
    ({"secure_aggregation": {"threshold": 4, "weighting": "uniform"}}, "weighting does not apply"),
    ({"privacy": {"record_noise_multiplier": 1.0}}, "above target_epsilon"),
    ({"privacy": {"unit": "site", "noise_multiplier": 1.0, "record_clip_norm": None}}, "only with unit: record"),
])
def test_a_distributed_job_needs_secure_aggregation_plain_steps_and_a_sigma_that_meets_its_target(
    change: dict[str, Any], words: str,
) -> None:
    with pytest.raises(ValidationError, match=words):
        JobSpec.model_validate(distributed(**change))


def test_a_per_patient_target_resolves_one_sigma_for_the_job_and_every_site_plans_the_same_epsilon(
    files: dict[str, Path],
) -> None:
    sigma = SPEC.privacy.record_noise_multiplier
    assert sigma is not None
    assert 0.999 <= epsilon_for(sigma, 20, 1e-5) <= 1.0  # within the calibration's 0.1 %, never above
    assert epsilon_for(sigma * 0.99, 20, 1e-5) > 1.0  # the least σ that meets it
    plans = {s: plan_privacy(SPEC, site_policy(s, files).privacy, None) for s in files}
    eps = {s: p.epsilon(20) for s, p in plans.items()}
    assert set(map(str, eps.values())) == {str({"record": eps["cleveland"]["record"]})}
    assert 0.99 < eps["cleveland"]["record"] <= 1.0
    # What one site's share alone guarantees (every other site colluding with the aggregator): σ/√t per patient.
    alone = plans["cleveland"].epsilon_alone(20)
    assert alone is not None and alone == pytest.approx(epsilon_for(sigma / 2, 20, 1e-5), rel=1e-6)


def test_one_records_scaled_gradient_sizes_the_noise_and_the_whole_update_only_the_modulus() -> None:
    q = job_quantization(SPEC, DIM)
    unit = record_step_norm(SPEC)
    assert unit == pytest.approx(4.0 * 0.5 / 512)
    assert q.unit_norm == unit and q.clip_norm == 1.0
    assert q.sensitivity == pytest.approx(q.scale * unit + math.sqrt(DIM))
    assert q.site_sigma == pytest.approx(q.noise_multiplier * q.sensitivity / 2)  # four shares make σ·Δ
    assert q.overflow_bound < 2**31
    # Sized for a site's whole update instead, the noise would be 256 times larger for the same guarantee.
    whole = quantize.plan(1.0, DIM, 4, 4, q.noise_multiplier)
    assert whole.site_sigma / whole.scale > 200 * q.site_sigma / q.scale
    with pytest.raises(SecAggError, match="unit_norm"):
        quantize.Quantization(q.scale, DIM, 4, 4, 1.0, clip_norm=1.0, unit_norm=2.0)
    # Each site sends its gradient sum unweighted; the aggregator divides by every survivor's records over b.
    counts = {"a": 200, "b": 100, "c": 50}
    assert weights(SPEC, counts) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert divisor(SPEC, counts, ["a", "c"]) == pytest.approx(250 / 512)


def test_a_site_steps_on_the_sum_of_its_records_clipped_gradients_without_noise(files: dict[str, Path]) -> None:
    d = load_site_data(files["cleveland"], SPEC.features, SPEC.dataset)
    model = build_model("logreg", SPEC.features.input_dim(), [])
    rng = np.random.default_rng(7)
    start = {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in get_weights(model).items()}
    set_weights(model, start)
    loss = clipped_gradient_step(model, d.x_train, d.y_train, SPEC)
    after = get_weights(model)
    # By hand: the logistic loss's gradient of record i is (p_i − y_i)·[x_i, 1], clipped to 0.5 in L2 norm.
    w, b = start["0.weight"].astype(np.float64).ravel(), float(start["0.bias"][0])
    x, y = d.x_train.astype(np.float64), d.y_train.astype(np.float64)
    p = 1 / (1 + np.exp(-(x @ w + b)))
    g = (p - y)[:, None] * np.hstack([x, np.ones((len(y), 1))])
    g *= np.minimum(1.0, 0.5 / np.linalg.norm(g, axis=1))[:, None]
    assert np.abs(g).max() > 0 and (np.linalg.norm((p - y)[:, None] * np.hstack([x, np.ones((len(y), 1))]),
                                                   axis=1) > 0.5).any()  # some records were clipped
    step = -4.0 / 512 * g.sum(axis=0)
    np.testing.assert_allclose(after["0.weight"].ravel() - w, step[:-1], atol=2e-6)
    np.testing.assert_allclose(after["0.bias"][0] - b, step[-1], atol=2e-6)
    assert loss == pytest.approx(float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))), rel=1e-4)
    # Nothing random at the site while training: the same start gives the same step, in chunks of any size.
    set_weights(model, start)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpsgd, "CHUNK", 7)
        clipped_gradient_step(model, d.x_train, d.y_train, SPEC)
    assert all(np.allclose(get_weights(model)[k], after[k], atol=1e-6) for k in after)
    # Past the round's deadline it stops, and the model is left as it was.
    set_weights(model, start)
    with pytest.raises(TrainingStoppedError, match="stopped after 0 of"):
        clipped_gradient_step(model, d.x_train, d.y_train, SPEC, should_stop=lambda: True)
    assert all(np.array_equal(get_weights(model)[k], start[k]) for k in start)


def test_a_sites_noise_share_is_added_under_the_mask_and_never_released_in_the_clear(
    tmp_path: Path, files: dict[str, Path],
) -> None:
    plan = plan_privacy(SPEC, site_policy("cleveland", files).privacy, None)
    q = plan.quantization
    assert q is not None and plan.distributed and plan.adds_noise_share
    state = AgentState(tmp_path / "agent.db")
    engine = PrivacyEngine(state)
    budget = BudgetPolicy(epsilon={"record": 4.0, "site": 100.0})
    update = {"0.weight": np.full((1, 25), 0.01, np.float32), "0.bias": np.full((1,), 0.02, np.float32)}
    with pytest.raises(ValueError, match="masked updates only"):
        engine.privatize("cleveland", "job-1", 1, SPEC, plan, update, 200, EvalMetrics(n=10, loss=0.5, auc=0.7),
                         0.5, budget=budget)
    assert state.release("job-1", 1) is None and state.spent("heart-disease", "record") == 0.0
    up = engine.privatize("cleveland", "job-1", 1, SPEC, plan, update, 200, EvalMetrics(n=10, loss=0.5, auc=0.7),
                          0.5, budget=budget, masker=lambda v: v)  # no mask: the noised, quantized vector itself
    sent = to_signed(decode(up.payload)["masked"]).astype(np.float64)
    clean = quantize.flatten(update) * q.scale
    noise = sent - clean
    # This site's share: a discrete Gaussian of std site_sigma per coordinate (26 values, a loose check).
    assert 0.4 * q.site_sigma < float(np.std(noise)) < 1.8 * q.site_sigma
    assert float(np.abs(noise).max()) > 1000 * math.sqrt(DIM)  # far beyond the rounding's < 1 per coordinate
    [spend] = up.envelope.privacy
    assert spend.unit == "record" and spend.noise_multiplier == SPEC.privacy.record_noise_multiplier
    assert spend.epsilon is not None and spend.epsilon_alone is not None and spend.epsilon_alone > spend.epsilon
    assert up.envelope.epsilon == spend.epsilon == pytest.approx(epsilon_for(spend.noise_multiplier, 1, 1e-5))
    assert state.spent("heart-disease", "record") == pytest.approx(spend.epsilon)
    assert state.spent("heart-disease", "site") == 0.0
    state.close()


def decide(policy: SitePolicy, spec: JobSpec) -> Any:
    d, _ = evaluate(policy, spec, policy.site, endpoints=[], spent={}, active_jobs=0, load=load_data)
    return d


def test_a_site_that_requires_the_site_unit_or_more_noise_refuses_with_its_reason(files: dict[str, Path]) -> None:
    assert decide(site_policy("hungary", files), SPEC).accepted
    d = decide(site_policy("hungary", files, required_units=["site"]), SPEC)
    assert not d.accepted
    assert any("requires update-level noise" in r and "record_noise: distributed" in r for r in d.reasons), d.reasons
    d = decide(site_policy("hungary", files, min_record_noise_multiplier=50.0), SPEC)
    assert not d.accepted
    sigma = SPEC.privacy.record_noise_multiplier
    assert any(f"σ {sigma:.3f} per patient record, below this site's floor 50" in r for r in d.reasons), d.reasons


def test_the_example_distributed_job_is_accepted_by_every_example_policy_at_one_epsilon(
    files: dict[str, Path],
) -> None:
    spec = JobSpec.from_yaml((ROOT / "examples" / "heart-disease-distributed.yaml").read_text())
    assert spec.privacy.record_noise == "distributed" and spec.secagg_threshold == 3
    planned = set()
    for site in files:
        d = decide(site_policy(site, files), spec)
        assert d.accepted, (site, d.reasons)
        planned.add(round(d.planned["record"], 9))
    [eps] = planned
    assert 0.99 < eps <= 1.0
