"""Policy rules that mean what they say: the cohort is the records a job trains on, validation is bounded, compute
per round is bounded from the spec before accepting, and the model's size is checked without building it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from agent.daemon import load_data
from agent.policy import DatasetPolicy, SitePolicy, evaluate
from federation.jobs import JobSpec
from fedsilo.cli import main
from fedsilo.datasets import split_by_center

ROOT = Path(__file__).resolve().parents[2]
JOB: dict[str, Any] = {**yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text()),
                       "model": {"name": "logreg"},
                       "privacy": {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.4, "delta": 1e-5}}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_by_center(tmp_path_factory.mktemp("d"))


@pytest.fixture(scope="module")
def policy(files: dict[str, Path]) -> SitePolicy:
    p = SitePolicy.load(ROOT / "policies" / "examples" / "hungary.yaml")
    ds = p.datasets["heart-disease"].model_copy(update={"path": files["hungary"]})
    egress = p.egress.model_copy(update={"allowed_endpoints": ["agg:443", "mq:8883"]})
    return p.model_copy(update={"datasets": {"heart-disease": ds}, "egress": egress})


def job(**changes: Any) -> JobSpec:
    data = json.loads(json.dumps(JOB))
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(data)


def with_dataset(policy: SitePolicy, **changes: Any) -> SitePolicy:
    ds: DatasetPolicy = policy.datasets["heart-disease"].model_copy(update=changes)
    return policy.model_copy(update={"datasets": {"heart-disease": ds}})


def reasons(policy: SitePolicy, spec: JobSpec, load: Any = load_data) -> list[str]:
    d, data = evaluate(policy, spec, "hungary", endpoints=["agg:443", "mq:8883"], spent={"site": 0.0},
                       active_jobs=0, load=load)
    assert (data is not None) == d.accepted
    return d.reasons


def test_min_cohort_counts_the_records_a_job_trains_on(policy: SitePolicy) -> None:
    # hungary has 293 records with a target: 200 ≤ 293, but half held out leaves 146 to train on
    strict = with_dataset(policy, min_cohort=200)
    got = reasons(strict, job(dataset={"validation_fraction": 0.5}))
    assert got == ["the job would train on 146 records (147 of 293 held out by validation_fraction 0.5), below "
                   "this site's minimum cohort of 200 training records"]
    assert reasons(strict, job(dataset={"validation_fraction": 0.3})) == []  # 205 training records


def test_validation_fraction_is_bounded_by_the_job_schema_and_by_the_policy(policy: SitePolicy) -> None:
    with pytest.raises(ValidationError, match=r"less than or equal to 0\.5"):
        job(dataset={"validation_fraction": 0.98})
    capped = with_dataset(policy, max_validation_fraction=0.25)
    assert reasons(capped, job()) == [
        "validation_fraction 0.333333 is above this site's maximum 0.25 for 'heart-disease'"]
    with pytest.raises(ValidationError):
        DatasetPolicy.model_validate({**policy.datasets["heart-disease"].model_dump(), "max_validation_fraction": 0.9})


@pytest.mark.parametrize(("changes", "limits", "expected"), [
    ({"hyperparameters": {"epochs": 1000, "batch_size": 1}}, {},
     "a round would take 195000 optimizer steps here (1000 epochs × ceil(195 training records / batch size 1)), "
     "above this site's maximum 10000"),
    ({"hyperparameters": {"epochs": 20, "batch_size": 64}}, {"max_examples_per_round": 1000},
     "a round would process 3900 training examples here, above this site's maximum 1000"),
    ({"round_deadline_s": 7200}, {},
     "rounds may last 7200 s (round_deadline_s), longer than this site trains a round (3600 s)"),
])
def test_compute_per_round_is_checked_before_accepting(
    policy: SitePolicy, changes: dict[str, Any], limits: dict[str, Any], expected: str,
) -> None:
    limited = policy.model_copy(update={"compute": policy.compute.model_copy(update=limits)})
    assert reasons(limited, job(**changes)) == [expected]


def test_max_steps_caps_the_work_a_round_is_charged_for(policy: SitePolicy) -> None:
    assert reasons(policy, job(hyperparameters={"epochs": 1000, "batch_size": 1, "max_steps": 500})) == []


def test_a_model_too_large_is_refused_from_its_spec_before_any_data_is_read(policy: SitePolicy) -> None:
    def no_read(*_: Any) -> Any:
        raise AssertionError("the data was read for a job refused from its spec")

    got = reasons(policy, job(model={"name": "mlp", "hidden": [4096, 4096]}), load=no_read)
    assert any("parameters, above this site's maximum 100000" in r for r in got), got


def test_policy_explain_refuses_the_reviews_cohort_bypass(tmp_path: Path, files: dict[str, Path]) -> None:
    """The review's case: min_cohort 80 and a job holding out 98% of the records."""
    policy = yaml.safe_load((ROOT / "policies" / "examples" / "hungary.yaml").read_text())
    policy["datasets"]["heart-disease"].update(path=str(files["hungary"]), min_cohort=80)
    policy_file, job_file = tmp_path / "policy.yaml", tmp_path / "job.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    job_file.write_text(yaml.safe_dump({**JOB, "dataset": {**JOB["dataset"], "validation_fraction": 0.98}}))
    out = CliRunner().invoke(main, ["policy", "explain", str(policy_file), str(job_file)])
    assert out.exit_code == 1, out.output
    assert out.output.startswith("REFUSE") and "dataset.validation_fraction" in out.output, out.output
    assert "Traceback" not in out.output
    job_file.write_text(yaml.safe_dump({**JOB, "dataset": {**JOB["dataset"], "validation_fraction": 0.5}}))
    policy["datasets"]["heart-disease"]["min_cohort"] = 150
    policy_file.write_text(yaml.safe_dump(policy))
    out = CliRunner().invoke(main, ["policy", "explain", str(policy_file), str(job_file)])
    assert out.exit_code == 1 and "REFUSE" in out.output and "train on 146 records" in out.output, out.output
