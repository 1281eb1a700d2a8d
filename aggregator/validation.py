"""Checks an uploaded update must pass before it is stored or aggregated.

Each failure is a `Rejection` with a stable reason code (a Prometheus label and an API error code) and a
sentence a person can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from federation.jobs import JobSpec
from federation.messages import UpdateEnvelope
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


def carries_update_noise(spec: JobSpec, envelope: UpdateEnvelope | None) -> bool:
    """Whether an update may carry update-level noise: always for the site unit; for the record unit only from a
    site whose policy also applies the site unit, which its envelope then says (a `site` entry in `privacy`)."""
    return spec.privacy.unit == "site" or (envelope is not None and envelope.spend("site") is not None)


def noise_norm_bound(spec: JobSpec, n_params: int, noised: bool = True) -> float:
    """An upper bound on a privatized update's norm: clip norm plus, if it is noised, a generous tail bound on the
    update-level noise. A record-level update without it (DP-SGD's noise is inside the clipped delta) gets C.

    ‖N(0, s²I_d)‖ concentrates at s·√d; s·(√d + 8) is exceeded with probability below e^-32.
    """
    p = spec.privacy
    sigma = p.noise_multiplier if noised else 0.0
    return p.clip_norm * (1.0 + 1e-4) + sigma * p.clip_norm * (math.sqrt(n_params) + 8.0)


def check_update(
    body: bytes, claimed_sha: str, template: Weights, spec: JobSpec, envelope: UpdateEnvelope | None = None,
) -> Weights:
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
    noised = carries_update_noise(spec, envelope)
    bound = noise_norm_bound(spec, sum(v.size for v in template.values()), noised)
    if norm > bound:
        what = (f"clipped (C={spec.privacy.clip_norm}) and noised (σ={spec.privacy.noise_multiplier})" if noised else
                f"clipped (C={spec.privacy.clip_norm}; record unit: no update-level noise)")
        raise Rejection("norm_implausible", f"update norm {norm:.4g} exceeds {bound:.4g}, the most a {what} update "
                                            "can plausibly have")
    return update
