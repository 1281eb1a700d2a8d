"""The least noise that meets a target ε: one bisection, used for both units.

Deterministic (the same inputs give the same σ on every machine running the same accountant), so a site can
recompute its plan after a restart and an aggregator can resolve a site-unit target once for every site.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from federation.accounting import dpsgd_epsilon

MAX_NOISE_MULTIPLIER = 1e4  # the largest σ a job may state or a calibration may return
REL_TOL = 1e-3  # the calibrated σ's ε lies within 0.1 % below the target


class TargetUnreachableError(ValueError):
    """No noise multiplier up to `MAX_NOISE_MULTIPLIER` meets the target."""


def calibrate(epsilon_at: Callable[[float], float], target: float, *, rel_tol: float = REL_TOL) -> float:
    """The smallest σ (to `rel_tol`) with `epsilon_at(σ) ≤ target`, for an ε that falls as σ grows."""
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target ε must be positive and finite, got {target}")
    hi = 1.0
    while epsilon_at(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise TargetUnreachableError(f"target ε {target:g} needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}")
        hi = min(hi * 2, MAX_NOISE_MULTIPLIER)
    lo = 0.0 if hi == 1.0 else hi / 2
    # Invariant: ε(hi) ≤ target < ε(lo). Stop once ε(hi) is within rel_tol below the target.
    while epsilon_at(hi) < target * (1 - rel_tol) and hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if epsilon_at(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


@functools.lru_cache(maxsize=256)
def dpsgd_noise(target: float, sampling_rate: float, steps: int, delta: float) -> float:
    """Record unit: the DP-SGD noise multiplier whose ε after `steps` Poisson-sampled steps meets `target`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return calibrate(lambda sigma: dpsgd_epsilon(sigma, sampling_rate, steps, delta), target)
