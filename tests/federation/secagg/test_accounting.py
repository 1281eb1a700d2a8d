"""The privacy of the summed discrete Gaussian noise as a Gaussian noise multiplier: the planned z at t
survivors (never above it), z/√t for a site's own noise, and ε that follows."""

from __future__ import annotations

import math

import pytest

from federation.accounting import gaussian_epsilon
from federation.secagg.accounting import (
    kairouz_tau,
    own_noise_multiplier,
    secure_epsilons,
    sum_noise_multiplier,
)
from federation.secagg.errors import SecAggError
from federation.secagg.quantize import Quantization, plan


def test_tau_follows_its_formula() -> None:
    assert kairouz_tau(0.75, 1) == 0.0
    expected = 10 * sum(math.exp(-2 * math.pi**2 * 0.75**2 * k / (k + 1)) for k in (1, 2, 3))
    assert kairouz_tau(0.75, 4) == pytest.approx(expected, rel=1e-12)
    assert kairouz_tau(1e4, 100) == 0.0


@pytest.mark.parametrize(("sites", "threshold", "z"), [(4, 3, 1.0), (20, 12, 0.7), (100, 60, 2.5)])
def test_planned_noise_gives_the_planned_multiplier(sites: int, threshold: int, z: float) -> None:
    q = plan(clip_norm=1.0, dim=10_000, sites=sites, threshold=threshold, noise_multiplier=z)
    assert q.site_sigma > 1e5  # far where τ vanishes
    z_eff = sum_noise_multiplier(q, threshold)
    assert z_eff <= z
    assert z_eff == pytest.approx(z, rel=1e-12)
    assert own_noise_multiplier(q) == pytest.approx(z / math.sqrt(threshold), rel=1e-12)
    assert sum_noise_multiplier(q, sites) >= z_eff  # more survivors, more noise


def test_tau_lowers_the_multiplier_at_a_few_units_of_noise() -> None:
    q = Quantization(scale=1.0, dim=4, sites=4, threshold=4, noise_multiplier=0.5, clip_norm=1.0)
    assert q.site_sigma == 0.75
    z_eff = sum_noise_multiplier(q, 4)
    tau = kairouz_tau(0.75, 4)
    l2 = 1 / 0.5
    assert z_eff == pytest.approx(1 / min(math.sqrt(l2**2 + 2 * tau * 4), l2 + tau * 2), rel=1e-12)
    assert 0.45 < z_eff < 0.5


def test_below_half_a_unit_nothing_is_claimed_for_a_sum() -> None:
    q = Quantization(scale=1.0, dim=1, sites=4, threshold=4, noise_multiplier=0.1, clip_norm=1.0)
    assert q.site_sigma < 0.5
    assert sum_noise_multiplier(q, 4) == 0.0
    assert own_noise_multiplier(q) == pytest.approx(0.05)  # one discrete Gaussian: Δ/σ exactly


def test_survivors_outside_threshold_to_sites_are_refused() -> None:
    q = plan(clip_norm=1.0, dim=100, sites=5, threshold=3, noise_multiplier=1.0)
    for survivors in (2, 6):
        with pytest.raises(SecAggError):
            sum_noise_multiplier(q, survivors)


def test_secure_epsilons() -> None:
    q = plan(clip_norm=1.0, dim=10_000, sites=8, threshold=5, noise_multiplier=1.2)
    eps_sum, eps_alone = secure_epsilons(q, releases=20, delta=1e-5)
    assert eps_sum == gaussian_epsilon(1.2, 20, 1e-5)
    assert eps_alone == gaussian_epsilon(1.2 / math.sqrt(5), 20, 1e-5)
    assert eps_sum < eps_alone
    assert secure_epsilons(q, releases=0, delta=1e-5) == (0.0, 0.0)
    silent = plan(clip_norm=1.0, dim=10_000, sites=8, threshold=5, noise_multiplier=0.0)
    assert secure_epsilons(silent, releases=1, delta=1e-5) == (math.inf, math.inf)
