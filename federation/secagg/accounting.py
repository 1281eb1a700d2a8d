"""What the sum of the sites' discrete Gaussian noise is worth in privacy, as an ordinary Gaussian noise
multiplier that the existing RDP accounting can charge.

Kairouz, Liu & Steinke (2021), "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation": the sum of s independent N_Z(0, σ²) per coordinate is nearly N_Z(0, sσ²), off by a factor governed
by τ = 10·Σ_{k=1}^{s−1} exp(−2π²σ²·k/(k+1)). For an integer difference of L2 norm ≤ Δ in d coordinates, and
l = Δ/(√s·σ), their Proposition 14 (as their reference code, google-research/federated's distributed_dp,
evaluates it) bounds the Rényi divergence of order α by both
    α/2 · l² + τ·d        and        α/2 · (l + τ·√d)²,
hence (1/2)ε²-zCDP with ε = min(√(l² + 2τd), l + τ√d) (the first because τd ≤ α·τd for every α ≥ 1).
Kairouz et al.'s Theorem 1 states the first term with τd/2 in place of 2τd; we take the form derived above,
which is never smaller. The two differ only when τ is not negligible, i.e. at σ of a few units: τ underflows to
0 for σ ≳ 9, and a planned quantization has σ in the millions.

A zCDP guarantee ρ = ε²/2 is exactly the RDP curve of a Gaussian mechanism with noise multiplier 1/ε at every
order, so the sum can be charged as `dp_accounting.GaussianDpEvent(1/ε)` with the RDP accountant. Not with the
PLD accountant: that would compute the privacy loss of an exact continuous Gaussian, which the sum is not.
"""

from __future__ import annotations

import math

from federation.accounting import gaussian_epsilon
from federation.secagg.errors import SecAggError
from federation.secagg.quantize import Quantization

_MIN_SIGMA = 0.5  # Kairouz et al.'s theorem assumes σ ≥ 1/2 for a sum of two or more


def kairouz_tau(site_sigma: float, threshold: int) -> float:
    """τ = 10·Σ_{k=1}^{threshold−1} exp(−2π²σ²·k/(k+1)), σ a site's std in quantized units and `threshold` the
    number of sites whose noise is summed; 0 for a single site."""
    if threshold < 1:
        raise SecAggError(f"at least one site's noise is summed, got {threshold}")
    a = 2.0 * math.pi**2 * site_sigma**2
    return 10.0 * math.fsum(math.exp(-a * k / (k + 1)) for k in range(1, threshold))


def _multiplier(q: Quantization, summed: int) -> float:
    """1/ε for the noise of `summed` sites (0 without noise, or where nothing is claimed).

    With σ = z·Δ/√t, l = Δ/(√s·σ) = √(t/s)/z, so z_eff = z·√(s/t)/r where r = ε/l ≥ 1 is the inflation τ
    causes; computed in that order so that r = 1 gives back exactly z at s = t, never a rounding above it."""
    sigma = q.site_sigma
    if sigma <= 0.0:
        return 0.0
    base = q.noise_multiplier * math.sqrt(summed / q.threshold)
    if summed == 1:
        return base  # one discrete Gaussian: Δ²/2σ²-zCDP exactly (Canonne, Kamath & Steinke 2020)
    if sigma < _MIN_SIGMA:
        return 0.0  # outside the theorem: claim nothing
    tau = kairouz_tau(sigma, summed)
    if tau == 0.0:
        return base
    l2 = 1.0 / base
    inflation = min(math.sqrt(1.0 + 2.0 * tau * q.dim / (l2 * l2)), 1.0 + tau * math.sqrt(q.dim) / l2)
    return base / inflation


def sum_noise_multiplier(q: Quantization, survivors: int) -> float:
    """z_eff = 1/ε for the noise of `survivors` sites (threshold ≤ survivors ≤ sites): charge
    GaussianDpEvent(z_eff) per release. At survivors = threshold this is what the ledger charges; it is at most
    q.noise_multiplier, equal to it once τ vanishes. 0 when there is no noise."""
    if not q.threshold <= survivors <= q.sites:
        raise SecAggError(
            f"{survivors} survivors: the noise is sized for at least {q.threshold} of {q.sites} sites")
    return _multiplier(q, survivors)


def own_noise_multiplier(q: Quantization) -> float:
    """z_eff of one site's noise alone: what protects a site if every other site colludes with the aggregator
    (they can subtract their own noise from the sum), q.noise_multiplier/√t."""
    return _multiplier(q, 1)


def secure_epsilons(q: Quantization, releases: int, delta: float) -> tuple[float, float]:
    """(ε of the sum at threshold survivors, ε of a site's own noise alone) after `releases` rounds at `delta`,
    by the RDP accountant; ∞ for both without noise."""
    return (gaussian_epsilon(sum_noise_multiplier(q, q.threshold), releases, delta),
            gaussian_epsilon(own_noise_multiplier(q), releases, delta))
