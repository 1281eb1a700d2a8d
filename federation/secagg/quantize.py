"""From float model updates to integers mod 2^32 and back, sized so that the sum of every site's vector plus its
noise never wraps around the modulus.

A site clips its update to L2 norm c, multiplies by `scale` (integer units per unit of update, 1/γ in Kairouz et
al.) and rounds each coordinate stochastically, up with probability equal to its fractional part, so the rounding
is unbiased. Each coordinate moves by less than one unit, so the rounded vector's L2 norm is below
scale·c + √d: that is the sensitivity the noise is sized for. The aggregator sums residues mod 2^32 and lifts
the sum to [−2^31, 2^31); that lift is the true integer sum as long as |sum| < 2^31 in every coordinate, which
`plan` makes hold with the margin of `overflow_bound` (twelve standard deviations of the summed noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from federation.noise import uniform
from federation.secagg.errors import SecAggError
from federation.secagg.masking import MODULUS, MODULUS_BITS, to_signed

_HALF_RANGE = 2 ** (MODULUS_BITS - 1)
# One unit is at most 2^-24 of the clip norm: float32, in which models and decoded updates live, has 24 bits of
# mantissa, so a coordinate as large as the clip norm cannot carry a finer step, and the rounding error is then
# far below any noise worth adding. What the cap leaves of 2^31 is headroom for many sites' sum and noise.
MAX_UNITS_PER_CLIP = 2.0**24
NOISE_TAIL = 12.0  # standard deviations of the summed noise the overflow bound allows for (P ≈ e^-72 per value)


@dataclass(frozen=True)
class Quantization:
    """How a round's updates are quantized and noised.

    scale: integer units per unit of update. dim: coordinates. sites: the roster size n (all of them may
    contribute). threshold: t, the fewest survivors whose summed noise must meet the privacy target.
    noise_multiplier: z of the sum, relative to `sensitivity`. clip_norm: the L2 bound of an update. unit_norm:
    the most one protected unit can change a site's update (None: the whole update, clip_norm; per patient with
    distributed noise: one record's scaled gradient)."""

    scale: float
    dim: int
    sites: int
    threshold: int
    noise_multiplier: float
    clip_norm: float
    unit_norm: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise SecAggError(f"scale must be positive, got {self.scale}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise SecAggError(f"clip_norm must be positive, got {self.clip_norm}")
        if self.dim < 1:
            raise SecAggError(f"dim must be at least 1, got {self.dim}")
        if not 1 <= self.threshold <= self.sites:
            raise SecAggError(f"need 1 ≤ threshold ≤ sites, got threshold {self.threshold}, sites {self.sites}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise SecAggError(f"noise_multiplier must be ≥ 0, got {self.noise_multiplier}")
        if self.unit_norm is not None and not (math.isfinite(self.unit_norm) and 0 < self.unit_norm <= self.clip_norm):
            raise SecAggError(f"unit_norm must be in (0, clip_norm], got {self.unit_norm}")

    @property
    def sensitivity(self) -> float:
        """L2 bound on how much one protected unit moves a site's quantized vector: scale·u (u the unit's norm,
        clip_norm for a whole site), plus < 1 per coordinate of rounding. (Clipping the update to clip_norm is a
        projection, so it cannot make one unit's change larger than u.)"""
        u = self.clip_norm if self.unit_norm is None else self.unit_norm
        return self.scale * u + math.sqrt(self.dim)

    @property
    def site_sigma(self) -> float:
        """The standard deviation of the discrete Gaussian each site adds, in units: t of them make z·Δ."""
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.threshold)

    @property
    def overflow_bound(self) -> float:
        """A bound on |Σ of all n sites' noised values| in any coordinate: n·(scale·c + 1) for the values (a
        coordinate is at most the vector's norm), plus twelve standard deviations of n sites' summed noise."""
        values = self.sites * (self.scale * self.clip_norm + 1.0)
        return values + NOISE_TAIL * self.site_sigma * math.sqrt(self.sites)


def plan(clip_norm: float, dim: int, sites: int, threshold: int, noise_multiplier: float,
         unit_norm: float | None = None) -> Quantization:
    """The finest quantization whose noised sum cannot wrap: the largest scale with overflow_bound < 2^31, at most
    MAX_UNITS_PER_CLIP / clip_norm.

    The bound is linear in the scale, A·scale + B with A = c·n + 12z·u·√(n/t) (u the unit's norm, c without one)
    and B = n + 12z·√(d·n/t), so the largest scale is (2^31 − B) / A, nudged down until the strict inequality
    holds in floating point."""
    probe = Quantization(1.0, dim, sites, threshold, noise_multiplier, clip_norm, unit_norm)  # validates them
    z, n, t = noise_multiplier, sites, threshold
    u = clip_norm if unit_norm is None else unit_norm
    slope = clip_norm * n + NOISE_TAIL * z * u * math.sqrt(n / t)
    intercept = n + NOISE_TAIL * z * math.sqrt(dim * n / t)
    room = _HALF_RANGE - intercept
    if room <= 0:
        raise SecAggError(
            f"no quantization fits 2^{MODULUS_BITS}: {n} sites and the noise for z={z:g}, t={t}, d={dim} "
            f"need {intercept:.4g} before any signal, the limit is {_HALF_RANGE}")
    scale = min(room / slope, MAX_UNITS_PER_CLIP / clip_norm)
    q = Quantization(scale, probe.dim, n, t, z, clip_norm, unit_norm)
    while q.overflow_bound >= _HALF_RANGE:
        scale = math.nextafter(scale, 0.0)
        q = Quantization(scale, probe.dim, n, t, z, clip_norm, unit_norm)
    return q


def flatten(weights: dict[str, np.ndarray]) -> np.ndarray:
    """Every array of `weights` in sorted key order, raveled into one float64 vector."""
    if not weights:
        return np.zeros(0)
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in sorted(weights)])


def unflatten(vec: np.ndarray, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`vec` cut back into `template`'s keys and shapes (float32), the inverse of `flatten`."""
    flat = np.asarray(vec)
    sizes = {k: int(np.asarray(template[k]).size) for k in sorted(template)}
    if flat.ndim != 1 or flat.size != sum(sizes.values()):
        raise SecAggError(f"vector of {flat.size} values for a template of {sum(sizes.values())}")
    out: dict[str, np.ndarray] = {}
    start = 0
    for k, size in sizes.items():
        out[k] = flat[start : start + size].astype(np.float32).reshape(np.shape(template[k]))
        start += size
    return out


def quantize(vec: np.ndarray, q: Quantization) -> np.ndarray:
    """`vec`·scale stochastically rounded to int64 (unbiased; the rounding draws from the OS's CSPRNG).

    A vector longer than clip_norm is first scaled down to it: the sensitivity and the overflow bound rest on
    that norm, so it is enforced here rather than trusted (a no-op for an update already clipped)."""
    x = np.asarray(vec, dtype=np.float64)
    if x.ndim != 1 or x.size != q.dim:
        raise SecAggError(f"expected a flat vector of {q.dim} values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise SecAggError("vector holds NaN or infinity")
    norm = float(np.linalg.norm(x))
    if norm > q.clip_norm:
        x = x * (q.clip_norm / norm)
    scaled = x * q.scale
    low = np.floor(scaled)
    up = uniform(x.size) < (scaled - low)
    return low.astype(np.int64) + up


def encode_mod(ints: np.ndarray) -> np.ndarray:
    """Integers as residues mod 2^32 in [0, 2^32) (int64), ready to mask."""
    a = np.asarray(ints)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise SecAggError("expected a flat integer vector")
    return a.astype(np.int64, copy=False) & np.int64(MODULUS - 1)


def decode_sum(total_mod: np.ndarray, q: Quantization, count: int) -> np.ndarray:
    """The mean update of `count` survivors (float64): the centered lift of their sum, over scale, over count."""
    if count < 1:
        raise SecAggError(f"count must be at least 1, got {count}")
    signed = to_signed(total_mod)
    if signed.size != q.dim:
        raise SecAggError(f"sum of {signed.size} values for dim {q.dim}")
    mean: np.ndarray = signed.astype(np.float64) / q.scale / count
    return mean
