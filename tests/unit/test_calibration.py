"""Target ε: a job states the privacy it wants, the accountant picks σ, and every party sees the same σ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from agent.daemon import load_data
from agent.policy import SitePolicy, evaluate
from federation.jobs import JobSpec
from federation.privacy import calibrate_noise, epsilon_for
from fedsilo.datasets import split_by_center

ROOT = Path(__file__).resolve().parents[2]
JOB: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text())


def job(rounds: int = 10, **privacy: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(JOB))
    data["rounds"] = rounds
    data["privacy"] = {"clip_norm": 0.3, "delta": 1e-5, **privacy}
    return data


@pytest.mark.parametrize(
    ("target", "rounds", "delta"),
    [(1.0, 10, 1e-5), (2.0, 5, 1e-5), (4.0, 20, 1e-5), (8.0, 3, 1e-5), (8.0, 50, 1e-6), (16.0, 1, 1e-3),
     (0.5, 100, 1e-5)],
)
def test_calibrated_sigma_spends_within_one_percent_below_the_target(target: float, rounds: int, delta: float) -> None:
    sigma = calibrate_noise(target, rounds, delta)
    eps = epsilon_for(sigma, rounds, delta)
    assert target * 0.99 <= eps <= target
    # A visibly smaller σ would overspend: the calibration is not just "any large σ".
    assert epsilon_for(sigma * 0.98, rounds, delta) > target


def test_more_rounds_or_a_tighter_target_need_more_noise() -> None:
    assert calibrate_noise(8.0, 20, 1e-5) > calibrate_noise(8.0, 10, 1e-5)
    assert calibrate_noise(1.0, 10, 1e-5) > calibrate_noise(8.0, 10, 1e-5)


def test_unreachable_or_invalid_targets_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="needs a noise multiplier above"):
        calibrate_noise(1e-6, 10_000, 1e-9)
    with pytest.raises(ValueError, match="positive and finite"):
        calibrate_noise(float("inf"), 10, 1e-5)


def test_a_job_with_a_target_keeps_both_and_every_party_resolves_the_same_sigma() -> None:
    spec = JobSpec.model_validate(job(rounds=10, target_epsilon=8.0))
    assert spec.privacy.target_epsilon == 8.0
    assert spec.privacy.noise_multiplier == calibrate_noise(8.0, 10, 1e-5)
    assert 8.0 * 0.99 <= epsilon_for(spec.privacy.noise_multiplier, 10, 1e-5) <= 8.0
    # The aggregator stores and signs the validated spec; an agent re-validates that JSON and gets the same σ.
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again.privacy == spec.privacy
    # A different number of rounds is a different calibration.
    assert JobSpec.model_validate(job(rounds=40, target_epsilon=8.0)).privacy.noise_multiplier > \
        spec.privacy.noise_multiplier


def test_a_stated_sigma_that_misses_the_target_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"noise_multiplier 0.5 gives ε .* above target_epsilon 1"):
        JobSpec.model_validate(job(target_epsilon=1.0, noise_multiplier=0.5))
    ok = JobSpec.model_validate(job(target_epsilon=1.0, noise_multiplier=50.0))
    assert ok.privacy.noise_multiplier == 50.0


def test_a_record_level_target_is_per_patient_and_left_to_each_site() -> None:
    spec = JobSpec.model_validate(job(target_epsilon=4.0, unit="record", record_clip_norm=1.0))
    # No single σ: each site calibrates DP-SGD's for its own records; no update-level noise is resolved.
    assert spec.privacy.noise_multiplier == 0.0 and spec.privacy.record_noise_multiplier is None
    with pytest.raises(ValidationError, match="exactly one of target_epsilon"):
        JobSpec.model_validate(job(target_epsilon=4.0, unit="record", record_clip_norm=1.0,
                                   record_noise_multiplier=1.0))
    with pytest.raises(ValidationError, match="needs record_clip_norm"):
        JobSpec.model_validate(job(target_epsilon=4.0, unit="record"))


def test_a_target_the_site_floor_cannot_meet_is_refused_with_the_numbers(tmp_path: Path) -> None:
    files = split_by_center(tmp_path)
    policy = SitePolicy.load(ROOT / "policies" / "examples" / "hungary.yaml")
    ds = policy.datasets["heart-disease"].model_copy(update={"path": files["hungary"]})
    policy = policy.model_copy(update={"datasets": {"heart-disease": ds}})
    floor = policy.privacy.min_noise_multiplier  # 0.3 in the example policy

    loose = JobSpec.model_validate(job(rounds=1, target_epsilon=60.0))
    assert loose.privacy.noise_multiplier < floor
    d, data = evaluate(policy, loose, "hungary", endpoints=[], spent={}, active_jobs=0, load=load_data)
    sigma = loose.privacy.noise_multiplier
    floor_eps = epsilon_for(floor, 1, 1e-5)
    assert (f"target ε 60 over 1 rounds (δ 1e-05) needs noise multiplier {sigma:.3f}, below this site's floor "
            f"{floor} (which allows at most ε {floor_eps:.2f} for these rounds)") in d.reasons
    assert data is None

    strict = JobSpec.model_validate(job(rounds=10, target_epsilon=8.0))
    d, data = evaluate(policy, strict, "hungary", endpoints=[], spent={}, active_jobs=0, load=load_data)
    assert not any("floor" in r for r in d.reasons), d.reasons
    # The policy's projected ε is the calibrated one: within 1 % below the job's target.
    assert d.epsilon_planned is not None and 8.0 * 0.99 <= d.epsilon_planned <= 8.0
