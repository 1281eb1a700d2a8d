"""Random draws that a differential-privacy guarantee rests on, read from the OS's CSPRNG and nothing else.

Noise that an adversary can regenerate can be subtracted, and then it protects nobody: a generator seeded from the
job's seed, the site's name and the round is known to the aggregator. So the Gaussian noise (DP-SGD and
update-level) and DP-SGD's Poisson sampling draw their bits from `os.urandom` (getrandom(2)), fresh on every call,
never from a seeded generator. Randomness nothing private rests on (model initialization, the data split, the
shuffling of non-private training) stays seeded and reproducible elsewhere.

Why our own sampler: Opacus's `secure_mode` would do this with `torchcsprng`, whose last release (0.2.1, 2021) is
built for torch 1.8 and does not install beside torch 2.13; numpy's and torch's generators are not cryptographic.

Floating-point attacks: a Gaussian sampled in floating point (Box–Muller here) does not have the support of a true
Gaussian, and Mironov (2012) and Jin et al. (2022) show how the pattern of representable outputs can reveal the
unnoised value. Each normal returned here is the sum of four Box–Muller normals divided by two, the mitigation of
Holohan & Braghin (2021) that Opacus's secure mode also uses: it fills in the gaps those attacks read. It is a
mitigation, not a proof: a discrete Gaussian on integers (Canonne, Kamath & Steinke 2020) would be exact and is not
used; nor does anything here model the rounding of the clipped sum itself (docs/privacy.md).
"""

from __future__ import annotations

import os

import numpy as np
import torch

_MANTISSA = 2.0**-53
_SUMMED = 4  # normals summed per output (Holohan & Braghin 2021); the sum is divided by √4 = 2


def uniform(n: int) -> np.ndarray:
    """`n` uniform doubles in [0, 1) with 53 random bits each, from the OS's CSPRNG."""
    if n <= 0:
        return np.zeros(0)
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * _MANTISSA


def _box_muller(n: int) -> np.ndarray:
    """`n` standard normals, two per pair of uniforms (cos and sin of one angle)."""
    pairs = (n + 1) // 2
    u = uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 − u ∈ (0, 1]: log never sees 0
    angle = 2.0 * np.pi * u[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def standard_normal(n: int) -> np.ndarray:
    """`n` independent N(0, 1) draws (float64), each the sum of four Box–Muller normals over two."""
    if n <= 0:
        return np.zeros(0)
    summed: np.ndarray = _box_muller(_SUMMED * n).reshape(_SUMMED, n).sum(axis=0) / 2.0  # ÷ √4
    return summed


def gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """N(0, std²) noise of `shape` (float64)."""
    n = int(np.prod(shape, dtype=np.int64))
    return (standard_normal(n) * std).reshape(shape)


def gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) noise shaped and typed like `reference` (for DP-SGD's noisy gradient sum)."""
    noise = gaussian(tuple(reference.shape), std)
    return torch.from_numpy(noise).to(dtype=reference.dtype, device=reference.device)


def poisson_sample(n: int, rate: float) -> np.ndarray:
    """The indices of a Poisson sample of `range(n)`: each record in independently with probability `rate`.

    Privacy amplification by sampling assumes exactly this: that nobody can predict who is in a batch."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {rate}")
    return np.flatnonzero(uniform(n) < rate)
