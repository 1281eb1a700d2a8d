"""Update validation: every malformed, mis-shaped, non-finite or implausible update is refused by reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from aggregator.validation import Rejection, check_update, noise_norm_bound
from federation.jobs import JobSpec
from federation.models import build_model, get_weights
from federation.tensors import encode, sha256_hex

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SPEC = JobSpec.from_yaml(EXAMPLE.read_text())
TEMPLATE = get_weights(build_model("logreg", 25))


def reason(body: bytes, sha: str | None = None) -> str:
    with pytest.raises(Rejection) as exc:
        check_update(body, sha or sha256_hex(body), TEMPLATE, SPEC)
    return exc.value.reason


def test_a_good_update_passes() -> None:
    update = {k: np.zeros_like(v) + 0.01 for k, v in TEMPLATE.items()}
    body = encode(update)
    out = check_update(body, sha256_hex(body), TEMPLATE, SPEC)
    np.testing.assert_array_equal(out["0.weight"], update["0.weight"])


def test_each_bad_update_has_its_reason() -> None:
    good = {k: np.zeros_like(v) for k, v in TEMPLATE.items()}
    assert reason(encode(good), "f" * 64) == "hash_mismatch"
    assert reason(b"not a safetensors file") == "malformed_payload"
    assert reason(encode({**good, "extra": np.zeros(1, np.float32)})) == "wrong_layout"
    assert reason(encode({**good, "0.weight": np.zeros((1, 24), np.float32)})) == "wrong_layout"
    assert reason(encode({**good, "0.weight": np.zeros((1, 25), np.float64)})) == "wrong_layout"
    nan = {**good, "0.bias": np.array([np.nan], np.float32)}
    assert reason(encode(nan)) == "non_finite"
    huge = {k: np.full_like(v, 1e3) for k, v in TEMPLATE.items()}
    assert reason(encode(huge)) == "norm_implausible"
    # Refused from the header's length alone, before it is parsed: metadata beside valid tensors, or a header
    # of many empty tensors.
    assert reason(save(good, metadata={"x": "y" * 60_000})) == "oversized_header"
    empty = {f"t{i}": np.zeros((0,), np.float32) for i in range(10_000)}
    assert reason(save({**good, **empty})) == "oversized_header"


def test_norm_bound_admits_real_noise() -> None:
    rng = np.random.default_rng(0)
    p = SPEC.privacy
    bound = noise_norm_bound(SPEC, 26)
    for _ in range(1000):
        noise = rng.normal(0, p.noise_multiplier * p.clip_norm, size=26)
        assert np.linalg.norm(noise) + p.clip_norm <= bound
