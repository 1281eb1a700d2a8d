"""Samples of the discrete Gaussian N_Z(0, σ²) (P(x) ∝ exp(−x²/2σ²) on the integers), the noise each site adds
before masking; the sum of t sites' samples protects the sum (Kairouz, Liu & Steinke 2021).

The algorithm is Canonne, Kamath & Steinke (2020), "The Discrete Gaussian for Differential Privacy": Algorithm 3
(discrete Laplace proposals with scale t = ⌊σ⌋ + 1, each kept with probability exp(−(|Y| − σ²/t)²/2σ²)) on top of
their Algorithm 2 for the discrete Laplace (U uniform on {0, …, t−1} kept with probability exp(−U/t), plus t
times a geometric count of Bernoulli(e^−1) successes, plus a sign). It runs vectorized over batches of
candidates, and every random bit comes from the OS's CSPRNG (os.urandom), never from a seeded generator.

Why this is safe with float64 where continuous Gaussians are not:

- The output is an integer and is added to an integer vector in exact integer arithmetic. The attacks on
  floating-point Gaussians (Mironov 2012; Jin et al. 2022) read the unnoised value from which doubles the noisy
  sum can take; here every integer is possible and the sum is exact, so there is nothing of the kind to read.
- Randomness is never truncated: the uniform integer on {0, …, t−1} is drawn by rejection (no modulo bias), and
  each Bernoulli(p) compares p with a uniform of unbounded precision, 64 bits at a time, until they differ, so it
  fires with probability exactly p for the float64 value p. (Comparing with a 53-bit uniform, as
  `federation.noise.uniform` gives, would make every probability below 2^-53 either 0 or 2^-53.)
- What remains is that each p is exp(·) of an argument computed in float64, not the real number. For the final
  acceptance, x = (|Y| − σ²/t)²/2σ² comes out within about (2x + √(2x))·2^-52 of the real value, so p is within a
  relative (2x + √(2x) + 2)·2^-52 (the last term for exp's own rounding); exp(−U/t) is within 2·2^-52, and the
  proposal's pmf at |z| = U + t·V within (V + 3)·2^-52. For |z| ≤ 10σ (all but about e^-50 of the mass) x ≤ 50 and
  V ≤ 9, so the pointwise errors add up to under 2^-44 and, with the normalizing constant off by as much again, the
  sampled pmf is within a factor e^(±η) of the exact one with η < 2^-43. (An inverse-CDF geometric with scale t, the
  simpler way to draw the proposal, is off by about t·2^-52 relative, 2^-35 at σ = 10^5, which is why the proposal
  is built from Algorithm 2's pieces instead.)
- A pointwise factor e^(±η) per draw carries through the sum of s sites' noise (e^(±sη)) and any post-processing, so
  a mechanism that is (ε, δ)-DP with exact samples is (ε + 2η·s·d·R, δ + (1 + e^ε)·s·d·R·e^-50)-DP with these, for d
  coordinates and R releases: at s·d·R = 10^10 that adds under 0.003 to ε and about 10^-11 to δ, a worst case over
  every rounding error lining up. It is small beside the reported ε and δ and is not added to them.
"""

from __future__ import annotations

import math
import os

import numpy as np

from federation.secagg.errors import SecAggError

MAX_SIGMA = 2.0**40  # keeps U + t·V far inside int64 and the float64 integers (< 2^53)
_BATCH = 1 << 18  # candidates per pass: bounds memory for long vectors
_EXP_MINUS_ONE = math.exp(-1.0)


def _words(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def _bernoulli(p: np.ndarray) -> np.ndarray:
    """One exact Bernoulli(p[i]) per entry, for float64 p in [0, 1].

    A uniform U in [0, 1) is revealed 64 bits at a time: U < p as soon as a word of U is below the same word of p's
    binary expansion, U > p as soon as it is above; only a tie (probability 2^-64) needs the next word. p has
    finitely many bits, so a tie after its last bit means U ≥ p."""
    prob = np.asarray(p, dtype=np.float64)
    out = prob >= 1.0
    pending = np.flatnonzero((prob > 0.0) & (prob < 1.0))
    rest = prob[pending]
    while pending.size:
        scaled = np.ldexp(rest, 64)  # exact: a power-of-two scaling
        word = np.floor(scaled)
        rest = scaled - word  # exact: the fractional part of a double
        u = _words(pending.size)
        w = word.astype(np.uint64)  # < 2^64 since p < 1
        out[pending[u < w]] = True
        tie = u == w
        pending, rest = pending[tie], rest[tie]
        keep = rest > 0.0  # nothing left of p: U ≥ p
        pending, rest = pending[keep], rest[keep]
    return out


def _geometric(n: int) -> np.ndarray:
    """n counts of Bernoulli(e^-1) successes before the first failure (P(V = v) = e^-v·(1 − e^-1))."""
    v = np.zeros(n, dtype=np.int64)
    alive = np.arange(n)
    while alive.size:
        alive = alive[_bernoulli(np.full(alive.size, _EXP_MINUS_ONE))]
        v[alive] += 1
    return v


def _discrete_laplace(m: int, t: int) -> np.ndarray:
    """Up to m draws of the discrete Laplace with scale t (P(y) ∝ exp(−|y|/t)): CKS Algorithm 2 with s = 1, one
    attempt per candidate (a rejected attempt is dropped, which leaves the survivors' distribution exact)."""
    words = _words(m)
    limit = (2**64 // t) * t  # accept words below a multiple of t: then word mod t is uniform
    if limit < 2**64:
        words = words[words < np.uint64(limit)]
    u = (words % np.uint64(t)).astype(np.int64)
    u = u[_bernoulli(np.exp(-u.astype(np.float64) / t))]
    x = u + t * _geometric(u.size)
    negative = (np.frombuffer(os.urandom(x.size), dtype=np.uint8) & 1).astype(bool)
    keep = ~(negative & (x == 0))  # −0 would count zero twice
    signed: np.ndarray = np.where(negative, -x, x)[keep]
    return signed


def sample(n: int, sigma: float) -> np.ndarray:
    """`n` independent draws of N_Z(0, σ²) (int64); zeros when σ = 0."""
    if n < 0:
        raise SecAggError(f"n must be ≥ 0, got {n}")
    if not (math.isfinite(sigma) and 0.0 <= sigma <= MAX_SIGMA):
        raise SecAggError(f"sigma must be in [0, 2^40], got {sigma}")
    out = np.zeros(n, dtype=np.int64)
    if sigma == 0.0 or n == 0:
        return out
    t = math.floor(sigma) + 1
    var = sigma * sigma
    center = var / t
    overdraw = 2.3 if sigma >= 2.0 else 3.0
    filled = 0
    while filled < n:
        # 0.48 of the candidates survive both rejections at large σ, 0.35 at σ near 1: ask for a little more.
        y = _discrete_laplace(min(_BATCH, int(overdraw * (n - filled)) + 64), t)
        dist = np.abs(y).astype(np.float64) - center
        y = y[_bernoulli(np.exp(-(dist * dist) / (2.0 * var)))]
        take = min(y.size, n - filled)
        out[filled : filled + take] = y[:take]
        filled += take
    return out
