"""The discrete Gaussian sampler: the right mean, variance and symmetry at small and large σ, the exact pmf by
a chi-square test, and Bernoulli draws that stay exact below 2^-64.

Tolerances are six standard errors (a false alarm about once in 10^8 runs per check), and p-values are
compared with 10^-6: the draws come from the OS's CSPRNG and cannot be seeded."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from federation.secagg import discrete_gaussian
from federation.secagg.discrete_gaussian import sample
from federation.secagg.errors import SecAggError

N = 200_000
P_MIN = 1e-6


def _pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support −12σ…12σ (at least ±12) and the exact normalized pmf of N_Z(0, σ²) on it."""
    k = max(12, math.ceil(12 * sigma))
    x = np.arange(-k, k + 1)
    w = np.exp(-(x.astype(np.float64) ** 2) / (2 * sigma * sigma))
    return x, w / w.sum()


def _moments(sigma: float) -> tuple[float, float]:
    """The exact variance and fourth moment (the discrete Gaussian's variance is below σ² at small σ: 0.215 at
    σ = 0.5); for large σ they equal the continuous ones to far below double precision."""
    if sigma > 50:
        return sigma**2, 3 * sigma**4
    x, p = _pmf(sigma)
    return float((p * x**2).sum()), float((p * x.astype(np.float64) ** 4).sum())


@pytest.mark.parametrize("sigma", [0.5, 3.0, 1e5])
def test_mean_variance_and_symmetry(sigma: float) -> None:
    x = sample(N, sigma)
    assert x.dtype == np.int64 and x.shape == (N,)
    var, fourth = _moments(sigma)
    assert abs(x.mean()) < 6 * math.sqrt(var / N)
    assert abs(x.var() - var) < 6 * math.sqrt((fourth - var**2) / N)
    above, below = int((x > 0).sum()), int((x < 0).sum())
    assert abs(above - below) < 6 * math.sqrt(above + below)
    if sigma == 0.5:
        ones, minus_ones = int((x == 1).sum()), int((x == -1).sum())
        assert abs(ones - minus_ones) < 6 * math.sqrt(ones + minus_ones)


def _chi_square_p(draws: np.ndarray, sigma: float) -> float:
    """Chi-square of the draws' histogram against N_Z(0, σ²), bins with expected count < 5 pooled at each end."""
    x, p = _pmf(sigma)
    observed = np.array([(draws == v).sum() for v in x], dtype=np.float64)
    observed[0] += (draws < x[0]).sum()
    observed[-1] += (draws > x[-1]).sum()
    expected = p * draws.size
    keep = expected >= 5
    lo, hi = np.argmax(keep), len(keep) - np.argmax(keep[::-1])  # the central run of well-filled bins
    obs = np.concatenate([[observed[:lo].sum()], observed[lo:hi], [observed[hi:].sum()]])
    exp = np.concatenate([[expected[:lo].sum()], expected[lo:hi], [expected[hi:].sum()]])
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_chi_square_against_the_exact_pmf() -> None:
    draws = sample(N, 2.0)
    assert _chi_square_p(draws, 2.0) > P_MIN
    assert _chi_square_p(draws, 2.2) < P_MIN  # the test can tell σ = 2 from σ = 2.2


def test_sigma_zero_and_empty() -> None:
    assert np.array_equal(sample(5, 0.0), np.zeros(5, dtype=np.int64))
    assert sample(0, 3.0).shape == (0,)


@pytest.mark.parametrize(("n", "sigma"), [(-1, 1.0), (3, -1.0), (3, math.nan), (3, math.inf), (3, 2.0**41)])
def test_bad_arguments_are_refused(n: int, sigma: float) -> None:
    with pytest.raises(SecAggError):
        sample(n, sigma)


def _scripted(words: list[int]) -> Iterator[np.ndarray]:
    for w in words:
        yield np.array([w], dtype=np.uint64)


@pytest.mark.parametrize(
    ("p", "words", "fires"),
    [
        (2.0**-70, [1], False),  # first word above p's first word (0): U > p
        (2.0**-70, [0, 2**58 - 1], True),  # tie on the first word, below on the second
        (2.0**-70, [0, 2**58], False),  # tie on both: nothing left of p, so U ≥ p
        (0.75, [3 * 2**62 - 1], True),
        (0.75, [3 * 2**62], False),
    ],
)
def test_bernoulli_compares_past_64_bits(
    monkeypatch: pytest.MonkeyPatch, p: float, words: list[int], fires: bool
) -> None:
    """Scripted uniform words walk the tie path: a probability of 2^-70 is not rounded to 0 or to 2^-64."""
    script = _scripted(words)
    monkeypatch.setattr(discrete_gaussian, "_words", lambda n: next(script))
    assert discrete_gaussian._bernoulli(np.array([p])).tolist() == [fires]
    assert next(script, None) is None  # every scripted word was used, no more


def test_bernoulli_rates() -> None:
    p = np.array([0.0, 1.0, 0.3, 1e-3])
    hits = np.stack([discrete_gaussian._bernoulli(p) for _ in range(20)])  # 20 × 4
    assert not hits[:, 0].any() and hits[:, 1].all()
    many = discrete_gaussian._bernoulli(np.full(N, 0.3))
    assert abs(many.mean() - 0.3) < 6 * math.sqrt(0.21 / N)
