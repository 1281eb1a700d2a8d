"""Whatever a site sends, parsing either refuses it or yields values the rest of the system can store, sum and
serve: finite numbers within `federation.bounds`, bounded lists and texts, strict JSON out (property-based)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from federation.bounds import MAX_EPSILON, MAX_ROUND, MAX_SAMPLES
from federation.jobs import JobSpec
from federation.messages import EvaluationReport, SiteEvent, SiteStatus, UpdateEnvelope

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SHA = "a" * 64
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 1e308, -0.0, 0.5]), st.booleans(), st.text(max_size=5),
)
JSON_VALUES = st.recursive(st.none() | NUMBERS | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=10)
VALID: dict[type[Any], dict[str, Any]] = {
    UpdateEnvelope: {"job_id": "job-1", "round": 1, "site": "mallory", "num_samples": 10, "sha256": SHA,
                     "evaluation": {"n": 5, "loss": 0.5, "auc": 0.5}, "train_loss": 0.5, "epsilon": 1.0},
    SiteStatus: {"site": "mallory", "state": "online", "at": 1.0},
    SiteEvent: {"site": "mallory", "job_id": "job-1", "kind": "refused", "reasons": ["no"], "at": 1.0},
    EvaluationReport: {"job_id": "job-1", "round": 1, "site": "mallory", "evaluation": {"n": 5}},
}


def to_json(value: Any) -> str:
    """JSON as a hostile client would send it: NaN and Infinity spelled out (Python's json writes them)."""
    return json.dumps(value)


def assert_storable(obj: Any) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            assert_storable(v)
    elif isinstance(obj, list):
        for v in obj:
            assert_storable(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        assert math.isfinite(obj) and 0 <= obj <= max(MAX_SAMPLES, MAX_EPSILON, MAX_ROUND)


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_site_message_is_refused_or_storable(model: type[Any], data: st.DataObject) -> None:
    base = dict(VALID[model])
    field = data.draw(st.sampled_from([*sorted(base), "extra"]))
    base[field] = data.draw(JSON_VALUES)
    try:
        msg = model.model_validate_json(to_json(base))
    except ValidationError:
        return
    dumped = msg.model_dump(mode="json")
    json.dumps(dumped, allow_nan=False)  # strict JSON out
    assert_storable({k: v for k, v in dumped.items() if k != "at"})


@pytest.mark.parametrize(("model", "field", "value"), [
    (UpdateEnvelope, "num_samples", 9223372036854775807), (UpdateEnvelope, "num_samples", True),
    (UpdateEnvelope, "epsilon", float("inf")), (UpdateEnvelope, "train_loss", float("nan")),
    (UpdateEnvelope, "evaluation", {"n": 5, "auc": 1e308}), (UpdateEnvelope, "evaluation", {"n": 5, "auc": 50}),
    (UpdateEnvelope, "evaluation", {"n": 5, "loss": -3}), (UpdateEnvelope, "num_samples", "10"),
    (SiteStatus, "at", float("inf")), (SiteStatus, "at", float("nan")), (SiteStatus, "version", "x" * 10_000),
    (SiteStatus, "active_jobs", ["job-1"] * 1000), (SiteEvent, "reasons", ["x"] * 1000),
    (SiteEvent, "epsilon_planned", float("inf")),
])
def test_the_findings_of_the_review_are_each_refused(model: type[Any], field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        model.model_validate_json(to_json({**VALID[model], field: value}))


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from([("rounds",), ("min_sites",), ("hyperparameters", "epochs"),
                             ("hyperparameters", "batch_size"), ("hyperparameters", "learning_rate"),
                             ("privacy", "clip_norm"), ("privacy", "noise_multiplier"), ("privacy", "delta"),
                             ("dataset", "validation_fraction"), ("round_deadline_s",), ("quorum",)]),
       value=JSON_VALUES)
def test_a_job_spec_is_refused_or_storable(path: tuple[str, ...], value: Any) -> None:
    job = yaml.safe_load(EXAMPLE.read_text())
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        spec = JobSpec.model_validate_json(json.dumps(job))
    except (ValidationError, ValueError):
        return
    json.dumps(spec.model_dump(mode="json"), allow_nan=False)
