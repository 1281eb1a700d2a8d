"""Job specs: the example job parses; bad fields are named; no-noise must be explicit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from aggregator.runner import initial_weights
from federation.jobs import JobSpec
from federation.messages import JobOffer, canonical_json

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


def example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def test_example_job_is_valid_and_has_the_13_features() -> None:
    spec = JobSpec.from_yaml(EXAMPLE.read_text())
    assert len(spec.features.columns()) == 13
    assert spec.features.input_dim() == 25
    # Per-patient privacy by default: record-level DP-SGD at ε ≤ 1 per patient record, δ = 1e-5.
    p = spec.privacy
    assert (p.unit, p.target_epsilon, p.delta, p.noise_multiplier) == ("record", 1.0, 1e-5, 0.0)


def errors_of(data: dict[str, Any]) -> set[str]:
    with pytest.raises(ValidationError) as exc:
        JobSpec.model_validate(data)
    return {".".join(str(p) for p in e["loc"]) for e in exc.value.errors()}


def test_bad_fields_are_each_named() -> None:
    data = example()
    data["rounds"] = 0
    data["hyperparameters"]["optimizer"] = "lbfgs"
    data["privacy"]["clip_norm"] = -1
    data["surprise"] = 1
    assert errors_of(data) >= {"rounds", "hyperparameters.optimizer", "privacy.clip_norm", "surprise"}


def test_zero_noise_requires_explicit_opt_in() -> None:
    data = example()
    data["privacy"] = {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0}
    with pytest.raises(ValidationError, match="allow_no_noise"):
        JobSpec.model_validate(data)
    data["privacy"]["allow_no_noise"] = True
    assert JobSpec.model_validate(data).privacy.noise_multiplier == 0


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("model", "name"), "resnet", "not registered"),
        (("min_sites",), 9, "exceeds"),
        (("sites",), ["cleveland", "cleveland"], "twice"),
        (("features", "target", "column"), "age", "also a feature"),
    ],
)
def test_inconsistent_jobs_are_refused(path: tuple[str, ...], value: object, message: str) -> None:
    data = example()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(data)


def test_canonical_json_is_stable() -> None:
    spec = JobSpec.from_yaml(EXAMPLE.read_text())
    a = canonical_json(JobOffer(job_id="job-1", spec=spec, requester="op", issued_at=1.0, expires_at=2.0,
                                nonce="ab" * 16))
    b = canonical_json(JobOffer.model_validate_json(a))
    assert a == b


def test_a_zero_start_is_all_zeros_and_refused_for_hidden_layers() -> None:
    data = {**example(), "model": {"name": "logreg"}}
    seeded = initial_weights(JobSpec.model_validate(data))
    assert any(abs(v).sum() > 0 for v in seeded.values())
    data["model"] = {"name": "logreg", "init": "zeros"}
    zeros = initial_weights(JobSpec.model_validate(data))
    assert {k: v.shape for k, v in zeros.items()} == {k: v.shape for k, v in seeded.items()}
    assert all(not v.any() for v in zeros.values())
    for mlp in ({"name": "mlp", "hidden": [8]}, {"name": "mlp"}):  # the bare mlp has a default hidden layer
        data["model"] = {**mlp, "init": "zeros"}
        with pytest.raises(ValidationError, match="same weights forever"):
            JobSpec.model_validate(data)


def test_a_prior_start_places_each_published_weight_on_its_input_and_nothing_else() -> None:
    data = example()
    spec = JobSpec.model_validate(data)
    names = spec.features.encoded_names()
    prior = {"age": 0.5, "thalch": -0.5, "sex=Male": 0.25}
    data["model"] = {"name": "logreg", "init": "prior", "prior": prior}
    weights = initial_weights(JobSpec.model_validate(data))
    (matrix,) = [v for v in weights.values() if v.ndim == 2]
    assert matrix.shape == (1, len(names))
    assert {names[i]: float(w) for i, w in enumerate(matrix[0]) if w} == prior
    assert all(not v.any() for v in weights.values() if v.ndim == 1)  # the bias starts at zero


@pytest.mark.parametrize(("model", "match"), [
    ({"name": "logreg", "init": "prior", "prior": {"cholesterol": 1.0}}, r"do not declare: \['cholesterol'\]"),
    ({"name": "logreg", "init": "prior"}, "init: prior needs `prior`"),
    ({"name": "logreg", "init": "zeros", "prior": {"age": 1.0}}, "`prior` needs init: prior"),
    ({"name": "logreg", "init": "prior", "prior": {"age": float("nan")}}, "finite"),
    ({"name": "mlp", "init": "prior", "prior": {"age": 1.0}}, "same weights forever"),
])
def test_a_prior_that_does_not_fit_the_job_is_refused_with_the_reason(model: dict[str, Any], match: str) -> None:
    data = example()
    data["model"] = model
    with pytest.raises(ValidationError, match=match):
        JobSpec.model_validate(data)


@pytest.mark.parametrize(("name", "hidden"), [("logreg", []), ("mlp", []), ("mlp", [7]), ("mlp", [40, 3, 9])])
def test_parameters_are_counted_without_building_and_match_the_built_model(name: str, hidden: list[int]) -> None:
    from federation.models import build_model, count_parameters, get_weights, parameter_count

    assert count_parameters(name, 25, hidden) == parameter_count(get_weights(build_model(name, 25, hidden)))
    with pytest.raises(KeyError, match="not registered"):
        count_parameters("resnet", 25, hidden)
