"""Update-level differential privacy (the site unit): clip a site's round delta, add Gaussian noise, account it.

The math lives here as plain functions; the agent's privacy engine (`agent.privacy`) is the only caller on the
send path. Noise comes from the OS's CSPRNG (`federation.noise`); accounting from dp-accounting
(`federation.accounting`). The record unit's DP-SGD is in `agent.dpsgd`, its accounting in the same modules.
"""

from __future__ import annotations

import functools

import numpy as np

from federation import noise
from federation.accounting import gaussian_epsilon
from federation.calibration import MAX_NOISE_MULTIPLIER, calibrate
from federation.models import Weights
from federation.tensors import l2_norm

__all__ = ["MAX_NOISE_MULTIPLIER", "add_gaussian_noise", "calibrate_noise", "clip", "epsilon_for", "privatize"]


def clip(update: Weights, clip_norm: float) -> tuple[Weights, float]:
    """Scale `update` so its global L2 norm is at most `clip_norm`; return it with the norm before clipping."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(np.float32) for k, v in update.items()}, norm


def add_gaussian_noise(update: Weights, std: float, rng: np.random.Generator | None = None) -> Weights:
    """Add N(0, std²) to every coordinate, drawn from the OS's CSPRNG. Only in-process simulations (benchmarks)
    pass `rng`, to repeat a draw; nothing on the send path does."""
    if std == 0:
        return {k: v.copy() for k, v in update.items()}
    draw = (lambda shape: rng.normal(0.0, std, size=shape)) if rng is not None else (
        lambda shape: noise.gaussian(shape, std))
    return {k: (v + draw(v.shape)).astype(np.float32) for k, v in update.items()}


def privatize(
    update: Weights, clip_norm: float, noise_multiplier: float, rng: np.random.Generator | None = None
) -> tuple[Weights, float]:
    """Clip to `clip_norm`, then add N(0, (noise_multiplier·clip_norm)²) to every coordinate."""
    clipped, norm = clip(update, clip_norm)
    return add_gaussian_noise(clipped, noise_multiplier * clip_norm, rng), norm


def epsilon_for(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """ε after `rounds` releases of the (sampled) Gaussian mechanism (RDP accountant, converted at δ)."""
    return gaussian_epsilon(noise_multiplier, rounds, delta, sampling_rate)


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier σ (to 0.1 %) whose ε after `rounds` full-participation releases at `delta`
    is at most `target_epsilon` (`federation.calibration.calibrate` on `epsilon_for`).

    Deterministic, so the aggregator and every agent resolve a job's target to the same σ. Raises ValueError when no
    σ up to `MAX_NOISE_MULTIPLIER` meets it."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    try:
        return calibrate(lambda sigma: epsilon_for(sigma, rounds, delta), target_epsilon)
    except ValueError as exc:
        raise ValueError(f"{exc} (over {rounds} rounds at δ {delta:g})") from None
