"""Quantization: the planned scale is the finest whose noised sum cannot wrap mod 2^32, rounding is unbiased and
moves no coordinate by a unit or more, and the sum decodes back to the mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from federation.secagg.errors import SecAggError
from federation.secagg.masking import add_mod
from federation.secagg.quantize import (
    MAX_UNITS_PER_CLIP,
    Quantization,
    decode_sum,
    encode_mod,
    flatten,
    plan,
    quantize,
    unflatten,
)

LIMIT = 2**31


def test_properties_follow_their_formulas() -> None:
    q = Quantization(scale=100.0, dim=400, sites=9, threshold=4, noise_multiplier=2.0, clip_norm=3.0)
    assert q.sensitivity == 300.0 + 20.0
    assert q.site_sigma == 2.0 * 320.0 / 2.0
    assert q.overflow_bound == pytest.approx(9 * 301.0 + 12 * 320.0 * 3.0)
    assert Quantization(100.0, 400, 9, 4, 0.0, 3.0).site_sigma == 0.0


def test_small_federations_get_the_capped_scale() -> None:
    q = plan(clip_norm=0.5, dim=10_000, sites=4, threshold=3, noise_multiplier=1.0)
    assert q.scale == MAX_UNITS_PER_CLIP / 0.5
    assert q.overflow_bound < LIMIT
    assert (q.sites, q.threshold, q.dim, q.noise_multiplier, q.clip_norm) == (4, 3, 10_000, 1.0, 0.5)


@pytest.mark.parametrize(("sites", "threshold", "z"), [(1000, 600, 1.0), (5000, 5000, 0.0), (300, 2, 40.0)])
def test_large_federations_get_the_largest_scale_that_fits(sites: int, threshold: int, z: float) -> None:
    q = plan(clip_norm=2.0, dim=50_000, sites=sites, threshold=threshold, noise_multiplier=z)
    assert q.scale < MAX_UNITS_PER_CLIP / 2.0
    assert q.overflow_bound < LIMIT
    finer = Quantization(q.scale * (1 + 1e-9), q.dim, sites, threshold, z, 2.0)
    assert finer.overflow_bound >= LIMIT


def test_impossible_plans_are_refused_with_the_numbers() -> None:
    with pytest.raises(SecAggError, match=r"2147483648"):
        plan(clip_norm=1.0, dim=10, sites=2**31, threshold=2, noise_multiplier=0.0)
    with pytest.raises(SecAggError, match=r"z=1e\+09"):
        plan(clip_norm=1.0, dim=10**6, sites=10, threshold=5, noise_multiplier=1e9)


@pytest.mark.parametrize(
    "args",
    [(0.0, 10, 4, 2, 1.0), (1.0, 0, 4, 2, 1.0), (1.0, 10, 4, 5, 1.0), (1.0, 10, 4, 0, 1.0), (1.0, 10, 4, 2, -1.0),
     (math.nan, 10, 4, 2, 1.0), (1.0, 10, 4, 2, math.inf)],
)
def test_bad_arguments_are_refused(args: tuple[float, int, int, int, float]) -> None:
    with pytest.raises(SecAggError):
        plan(*args)


def test_flatten_and_unflatten_round_trip() -> None:
    weights = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.5], dtype=np.float32),
               "c": np.zeros((0,), dtype=np.float32)}
    flat = flatten(weights)
    assert flat.dtype == np.float64
    assert flat.tolist() == [7.5, 0, 1, 2, 3, 4, 5]  # sorted keys
    back = unflatten(flat, weights)
    assert list(back) == ["a", "b", "c"]
    for k in weights:
        assert back[k].dtype == np.float32 and back[k].shape == weights[k].shape
        assert np.array_equal(back[k], weights[k])
    with pytest.raises(SecAggError, match="7"):
        unflatten(flat[:-1], weights)


def test_rounding_moves_each_coordinate_by_less_than_one_unit_and_is_unbiased() -> None:
    n = 100_000
    q = Quantization(scale=10.0, dim=n, sites=2, threshold=2, noise_multiplier=0.0, clip_norm=1e6)
    vec = np.full(n, 0.73)
    ints = quantize(vec, q)
    assert ints.dtype == np.int64
    assert set(np.unique(ints).tolist()) == {7, 8}
    assert abs(ints.mean() - 7.3) < 6 * math.sqrt(0.21 / n)
    neg = quantize(-vec, q)
    assert set(np.unique(neg).tolist()) == {-8, -7}
    assert abs(neg.mean() + 7.3) < 6 * math.sqrt(0.21 / n)
    exact = quantize(np.full(n, 0.5), q)
    assert np.all(exact == 5)


def test_quantize_enforces_the_clip_norm() -> None:
    q = Quantization(scale=1000.0, dim=100, sites=2, threshold=2, noise_multiplier=0.0, clip_norm=1.0)
    too_long = np.full(100, 1.0)  # norm 10
    ints = quantize(too_long, q)
    assert np.linalg.norm(ints) <= q.sensitivity
    assert np.all(np.abs(ints - 100.0) < 1.0)  # scaled to norm 1 first: each coordinate 0.1 → 100 units


@pytest.mark.parametrize("vec", [np.zeros(99), np.zeros((10, 10)), np.array([math.nan] + [0.0] * 99)])
def test_quantize_refuses_malformed_vectors(vec: np.ndarray) -> None:
    q = Quantization(scale=1000.0, dim=100, sites=2, threshold=2, noise_multiplier=0.0, clip_norm=1.0)
    with pytest.raises(SecAggError):
        quantize(vec, q)


def test_encode_and_decode() -> None:
    q = Quantization(scale=4.0, dim=4, sites=2, threshold=2, noise_multiplier=0.0, clip_norm=1e6)
    ints = np.array([-(2**31), -1, 0, 2**31 - 1])
    enc = encode_mod(ints)
    assert enc.tolist() == [2**31, 2**32 - 1, 0, 2**31 - 1]
    assert decode_sum(enc, q, 1).tolist() == [-(2**31) / 4, -0.25, 0.0, (2**31 - 1) / 4]
    assert decode_sum(enc, q, 2).tolist() == [-(2**31) / 8, -0.125, 0.0, (2**31 - 1) / 8]
    with pytest.raises(SecAggError):
        decode_sum(enc, q, 0)
    with pytest.raises(SecAggError):
        decode_sum(enc[:3], q, 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_extreme_sum_does_not_wrap(sign: float) -> None:
    """Every site at the clip norm in one coordinate, same sign: the largest sum the bound allows for."""
    q = plan(clip_norm=1.0, dim=16, sites=6, threshold=6, noise_multiplier=0.0)
    vec = np.zeros(16)
    vec[3] = sign
    total = np.zeros(16, dtype=np.int64)
    for _ in range(q.sites):
        total = add_mod(total, encode_mod(quantize(vec, q)))
    mean = decode_sum(total, q, q.sites)
    assert abs(mean[3] - sign) < 1 / q.scale
    assert np.all(mean[np.arange(16) != 3] == 0.0)
