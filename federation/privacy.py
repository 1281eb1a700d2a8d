"""Update-level differential privacy: clip a site's round delta, add Gaussian noise, account the spend.

The math lives here as plain functions; the agent's privacy engine (`agent.privacy`) is the only caller
on the send path. Accounting uses dp-accounting's RDP accountant rather than closed-form formulas.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import numpy as np

from federation.models import Weights
from federation.tensors import l2_norm

MAX_NOISE_MULTIPLIER = 1e4  # the largest σ a job may state (`federation.jobs.PrivacySpec`)
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def clip(update: Weights, clip_norm: float) -> tuple[Weights, float]:
    """Scale `update` so its global L2 norm is at most `clip_norm`; return it with the norm before clipping."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(np.float32) for k, v in update.items()}, norm


def add_gaussian_noise(
    update: Weights, std: float, rng: np.random.Generator
) -> Weights:
    if std == 0:
        return {k: v.copy() for k, v in update.items()}
    return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) for k, v in update.items()}


def privatize(
    update: Weights, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[Weights, float]:
    """Clip to `clip_norm`, then add N(0, (noise_multiplier·clip_norm)²) to every coordinate."""
    clipped, norm = clip(update, clip_norm)
    return add_gaussian_noise(clipped, noise_multiplier * clip_norm, rng), norm


def epsilon_for(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """ε after `rounds` releases of the sampled Gaussian mechanism (RDP accountant, converted at δ)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, rounds: int, delta: float, rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier σ (to `rel_tol`) whose ε after `rounds` full-participation releases at `delta`
    is at most `target_epsilon`: bisection on `epsilon_for`, which falls as σ grows.

    Deterministic (same inputs, same σ on every machine running the same accountant), so the aggregator and every
    agent resolve a job's target to the same σ. Raises ValueError when no σ up to `MAX_NOISE_MULTIPLIER` meets it.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target ε must be positive and finite, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    hi = 1.0
    while epsilon_for(hi, rounds, delta) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target ε {target_epsilon:g} over {rounds} rounds at δ {delta:g} needs a noise "
                             f"multiplier above {MAX_NOISE_MULTIPLIER:g}")
        hi = min(hi * 2, MAX_NOISE_MULTIPLIER)
    lo = 0.0 if hi == 1.0 else hi / 2
    # Invariant: ε(hi) ≤ target < ε(lo). Stop once ε(hi) is within rel_tol below the target.
    while epsilon_for(hi, rounds, delta) < target_epsilon * (1 - rel_tol) and hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if epsilon_for(mid, rounds, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
