"""Update-level DP math: clipping bounds the norm, noise has the requested scale, accounting matches RDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.privacy import add_gaussian_noise, clip, epsilon_for, privatize
from federation.tensors import l2_norm


def _update(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {
        "0.weight": (rng.normal(size=(1, 25)) * scale).astype(np.float32),
        "0.bias": (rng.normal(size=(1,)) * scale).astype(np.float32),
    }


@settings(max_examples=200, deadline=None)
@given(scale=st.floats(1e-6, 1e4), clip_norm=st.floats(1e-3, 100), seed=st.integers(0, 2**32 - 1))
def test_clip_bounds_the_norm(scale: float, clip_norm: float, seed: int) -> None:
    update = _update(np.random.default_rng(seed), scale)
    clipped, norm_before = clip(update, clip_norm)
    assert l2_norm(clipped) <= clip_norm * (1 + 1e-5)
    assert norm_before == pytest.approx(l2_norm(update), rel=1e-9)
    if norm_before <= clip_norm:  # small updates pass unchanged
        for k in update:
            np.testing.assert_allclose(clipped[k], update[k], rtol=1e-6)
    else:  # large ones keep their direction and land on the sphere
        assert l2_norm(clipped) == pytest.approx(clip_norm, rel=1e-5)
        ratio = clipped["0.weight"] / update["0.weight"]
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)


def test_noise_has_the_requested_standard_deviation() -> None:
    rng = np.random.default_rng(1)
    zero = {"w": np.zeros((200, 500), dtype=np.float32)}
    noisy = add_gaussian_noise(zero, 0.7, rng)["w"]
    assert noisy.dtype == np.float32
    assert noisy.mean() == pytest.approx(0.0, abs=0.01)
    assert noisy.std() == pytest.approx(0.7, rel=0.01)


def test_privatize_noise_scale_is_multiplier_times_clip() -> None:
    rng = np.random.default_rng(2)
    update = {"w": np.full((100_000,), 10.0, dtype=np.float32)}
    noisy, norm = privatize(update, clip_norm=2.0, noise_multiplier=0.5, rng=rng)
    assert norm == pytest.approx(10.0 * math.sqrt(100_000), rel=1e-6)
    clipped_value = 2.0 / math.sqrt(100_000)
    residual = noisy["w"] - clipped_value
    assert residual.std() == pytest.approx(0.5 * 2.0, rel=0.02)


def test_zero_noise_multiplier_only_clips() -> None:
    update = {"w": np.array([3.0, 4.0], dtype=np.float32)}
    noisy, _ = privatize(update, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(noisy["w"], [0.6, 0.8], rtol=1e-6)


def test_epsilon_matches_the_rdp_accountant_reference() -> None:
    # q=1, σ=1, 20 releases, δ=1e-5 → ε≈30.13 with dp-accounting's RDP accountant (and Opacus's RDP analysis).
    assert epsilon_for(1.0, 20, 1e-5) == pytest.approx(30.13, abs=0.05)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert epsilon_for(1.0, 0, 1e-5) == 0.0
    assert epsilon_for(1.0, 5, 1e-5) < epsilon_for(1.0, 10, 1e-5)
    assert epsilon_for(2.0, 10, 1e-5) < epsilon_for(1.0, 10, 1e-5)
    assert epsilon_for(0.0, 1, 1e-5) == math.inf
