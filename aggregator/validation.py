"""Checks an uploaded update must pass before it is stored or aggregated.

Each failure is a `Rejection` with a stable reason code (a Prometheus label and an API error code) and a
sentence a person can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from federation.jobs import JobSpec
from federation.models import Weights, check_layout
from federation.tensors import (
    HeaderTooLarge,
    PayloadError,
    SizeMismatch,
    all_finite,
    check_frame,
    decode,
    l2_norm,
    sha256_hex,
)


@dataclass(frozen=True)
class Rejection(Exception):
    reason: str
    detail: str
    status: int = 400

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def noise_norm_bound(spec: JobSpec, n_params: int) -> float:
    """An upper bound on a privatized update's norm: clip norm plus a generous tail bound on the noise.

    ‖N(0, s²I_d)‖ concentrates at s·√d; s·(√d + 8) is exceeded with probability below e^-32.
    """
    p = spec.privacy
    return p.clip_norm * (1.0 + 1e-4) + p.noise_multiplier * p.clip_norm * (math.sqrt(n_params) + 8.0)


def check_update(body: bytes, claimed_sha: str, template: Weights, spec: JobSpec) -> Weights:
    """Decode and validate one update body against the job; raise `Rejection` on the first problem."""
    if sha256_hex(body) != claimed_sha:
        raise Rejection("hash_mismatch", "the body's sha256 differs from the envelope's")
    try:
        check_frame(body, template)
    except HeaderTooLarge as exc:
        raise Rejection("oversized_header", str(exc)) from None
    except SizeMismatch as exc:
        raise Rejection("wrong_layout", str(exc)) from None
    except PayloadError as exc:
        raise Rejection("malformed_payload", str(exc)) from None
    try:
        update = decode(body)
    except PayloadError as exc:
        raise Rejection("malformed_payload", str(exc)) from None
    try:
        check_layout(update, template)
    except ValueError as exc:
        raise Rejection("wrong_layout", str(exc)) from None
    if not all_finite(update):
        raise Rejection("non_finite", "the update contains NaN or infinite values")
    norm = l2_norm(update)
    bound = noise_norm_bound(spec, sum(v.size for v in template.values()))
    if norm > bound:
        raise Rejection(
            "norm_implausible",
            f"update norm {norm:.4g} exceeds {bound:.4g}, the most a clipped (C={spec.privacy.clip_norm}) and "
            f"noised (σ={spec.privacy.noise_multiplier}) update can plausibly have",
        )
    return update
