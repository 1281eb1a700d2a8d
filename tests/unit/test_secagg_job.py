"""A job's secure-aggregation switch: its defaults, what it refuses, and the weights both sides derive from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from federation.jobs import JobSpec
from federation.secagg.job import weights

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


def job(**extra: Any) -> JobSpec:
    data: dict[str, Any] = {**yaml.safe_load(EXAMPLE.read_text()), **extra}
    return JobSpec.model_validate(data)


def site_unit() -> dict[str, Any]:
    return {"unit": "site", "clip_norm": 0.5, "noise_multiplier": 1.0}


def test_the_switch_and_its_defaults() -> None:
    assert job().secure_aggregation is None and job().secagg_threshold == 0
    on = job(secure_aggregation=True, min_sites=2)
    assert on.secure_aggregation is not None and on.secagg_threshold == 3  # more than half of 4
    assert job(secure_aggregation=True, min_sites=4).secagg_threshold == 4  # never below min_sites
    assert on.secagg_weighting == "samples"  # per patient: no update-level noise to weigh down
    assert job(secure_aggregation=True, privacy=site_unit()).secagg_weighting == "uniform"
    assert job(secure_aggregation={"weighting": "samples"}, privacy=site_unit()).secagg_weighting == "samples"
    assert job(secure_aggregation=False).secure_aggregation is None


@pytest.mark.parametrize(("extra", "message"), [
    ({"aggregation": "median"}, "needs every site's update"),
    ({"aggregation": "trimmed_mean"}, "needs every site's update"),
    ({"aggregation": "fedavg_normbound"}, "needs every site's update"),
    ({"secure_aggregation": {"threshold": 2}, "min_sites": 2}, "more than half the 4 sites"),
    ({"secure_aggregation": {"threshold": 5}}, "at most 4"),
    ({"secure_aggregation": {"threshold": 3}, "min_sites": 4}, "below min_sites 4"),
    ({"sites": ["cleveland"], "min_sites": 1}, "at least 2 sites"),
])
def test_what_a_secure_job_refuses(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        job(**{"secure_aggregation": True, **extra})


def test_weights_are_record_counts_over_the_largest_or_all_one() -> None:
    counts = {"a": 200, "b": 50, "c": 100}
    assert weights(job(secure_aggregation=True), counts) == {"a": 1.0, "b": 0.25, "c": 0.5}
    assert weights(job(secure_aggregation=True, privacy=site_unit()), counts) == dict.fromkeys(counts, 1.0)
