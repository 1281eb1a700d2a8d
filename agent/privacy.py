"""The agent's privacy engine: the one place an update becomes releasable.

It clips the round delta to the job's update bound and, where the site unit applies, adds update-level noise
(`federation.privacy`; none for a record-level job, whose guarantee DP-SGD gave during training); it accounts the
spend in every unit the site's plan protects (`agent.privacy_policy.SitePrivacy`), refuses to exceed any of the
dataset's budgets, and writes spend and released bytes to the durable release log *before* returning. Only this
module can construct a `PrivatizedUpdate`, and the egress gate sends nothing else.

A secure-aggregation round passes a `masker` (`agent.secagg.SecureRound.mask` bound to the round's roster): the
clipped update is quantized, this site's share of the discrete Gaussian noise is added (site unit; none for a
record-level job that does not also protect the site unit), and the masked vector is what is logged and released:
a crash after the ledger is written resends the same masked bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from agent.privacy_policy import BudgetPolicy, SitePrivacy, per_unit
from agent.state import AgentState, Release
from federation.jobs import UNIT_WORDS, JobSpec
from federation.messages import EvalMetrics, UnitSpend, UpdateEnvelope
from federation.models import Weights
from federation.privacy import privatize
from federation.secagg import discrete_gaussian, quantize
from federation.tensors import encode, sha256_hex

_TOKEN = object()
DAY = 86_400.0


class AlreadyReleasedError(RuntimeError):
    """This round already released an update; releasing another would spend privacy twice."""


class BudgetExhaustedError(RuntimeError):
    """Releasing this round would take the dataset past its privacy budget."""


class RoundLateError(RuntimeError):
    """The round's deadline passed before its update could be released: it is not released, so not charged (the
    aggregator would refuse it as late, and ε spent on an update nobody uses is privacy lost for nothing)."""


def budget_window_start(reset_period_days: int | None, now: float | None = None) -> float:
    return 0.0 if reset_period_days is None else (now or time.time()) - reset_period_days * DAY


class PrivatizedUpdate:
    """Clipped, noised, accounted update bytes with their envelope. Not constructible outside this module."""

    __slots__ = ("envelope", "job_id", "payload", "round")

    def __init__(self, token: object, job_id: str, rnd: int, payload: bytes, envelope: UpdateEnvelope) -> None:
        if token is not _TOKEN:
            raise TypeError("a PrivatizedUpdate is only made by agent.privacy.PrivacyEngine")
        self.job_id, self.round, self.payload, self.envelope = job_id, rnd, payload, envelope


class PrivacyEngine:
    def __init__(self, state: AgentState) -> None:
        self._state = state

    def privatize(
        self, site: str, job_id: str, rnd: int, spec: JobSpec, plan: SitePrivacy, delta: Weights, num_samples: int,
        evaluation: EvalMetrics | None, train_loss: float, budget: BudgetPolicy, budget_since: float = 0.0,
        share_tracking: bool = True, release_by: float | None = None,
        masker: Callable[[np.ndarray], np.ndarray] | None = None, weight: float = 1.0,
    ) -> PrivatizedUpdate:
        """Clip (and noise, for the site unit), account and log one round's update. `budget` is the dataset's
        (per period starting at `budget_since`); a release that would exceed it in any unit raises
        `BudgetExhaustedError`. Past `release_by` (the round's deadline, a `time.time()`) nothing is released or
        charged: `RoundLateError`. With `masker` (secure aggregation) the payload is the masked quantized update,
        the clipped update scaled by `weight` (≤ 1, its weight in the sum) before its noise share is added; if the
        masker raises, nothing is released or charged."""
        if self._state.release(job_id, rnd) is not None:
            raise AlreadyReleasedError(f"round {rnd} of job {job_id} already released an update")
        now = time.time()
        if release_by is not None and now > release_by:
            raise RoundLateError(f"round {rnd} finished {now - release_by:.1f} s after its deadline: its update was "
                                 "not released and no ε was charged")
        releases = self._state.releases_for(job_id) + 1
        eps = plan.epsilon(releases)
        for unit, e in eps.items():
            total = per_unit(budget.epsilon, unit)
            others = self._state.spent(spec.dataset.name, unit, budget_since, exclude_job=job_id)
            if total is None or others + e > total:
                raise BudgetExhaustedError(
                    f"round {rnd} would bring ε {UNIT_WORDS[unit]} on {spec.dataset.name!r} to {others + e:.2f}, "
                    f"past the budget {total if total is not None else 'of none'}"
                )
        if masker is None:
            if plan.distributed:  # its noise is added only under the mask: never sent in the clear
                raise ValueError("a job with distributed per-patient noise releases masked updates only")
            released, _ = privatize(delta, plan.clip_norm, plan.update_noise)
            payload = encode(released)
        else:
            payload = encode({"masked": _masked(delta, plan, masker, weight)})
        record_sigma = (plan.record.noise_multiplier if plan.record is not None
                        else (spec.privacy.record_noise_multiplier or 0.0) if plan.distributed else 0.0)
        sigma = {"site": plan.update_noise, "record": record_sigma}
        alone = plan.epsilon_alone(releases) if masker is not None else None
        alone = alone if alone is not None and math.isfinite(alone) else None
        shared = "record" if plan.distributed else "site"  # the unit whose noise is shared out in the secure sum
        spend = [UnitSpend(unit=u, epsilon=e if math.isfinite(e) else None, noise_multiplier=sigma[u],  # type: ignore[arg-type]
                           epsilon_alone=alone if u == shared else None)
                 for u, e in eps.items()]
        headline = eps.get(spec.privacy.unit, math.inf)
        envelope = UpdateEnvelope(
            job_id=job_id, round=rnd, site=site, num_samples=num_samples, sha256=sha256_hex(payload),
            evaluation=evaluation, train_loss=train_loss, epsilon=headline if math.isfinite(headline) else None,
            privacy=spend, share_tracking=share_tracking,
        )
        self._state.record_release(
            Release(job_id, rnd, spec.dataset.name, sigma[spec.privacy.unit], headline, payload,
                    envelope.model_dump_json(), sent=False),
            spend=eps,
        )
        return PrivatizedUpdate(_TOKEN, job_id, rnd, payload, envelope)

    def pending(self, job_id: str, rnd: int) -> PrivatizedUpdate | None:
        """The update already released for this round (to resend after a crash), if any."""
        r = self._state.release(job_id, rnd)
        if r is None:
            return None
        return PrivatizedUpdate(_TOKEN, job_id, rnd, r.payload, UpdateEnvelope.model_validate_json(r.envelope))


def _masked(delta: Weights, plan: SitePrivacy, masker: Callable[[np.ndarray], np.ndarray],
            weight: float = 1.0) -> np.ndarray:
    """Flatten (keys sorted), clip, quantize, add this site's discrete Gaussian share (site unit, or distributed
    per-patient noise), reduce mod 2^32, mask.

    Clipped in float64 to a hair under C (2^-40 relative), so float rounding cannot take the norm past the C that
    the quantization's sensitivity assumes."""
    q = plan.quantization
    if q is None:
        raise ValueError("a masked release needs the job's quantization (a secure-aggregation plan)")
    vec = quantize.flatten(delta)
    norm, bound = float(np.linalg.norm(vec)), plan.clip_norm * (1 - 2**-40)
    if not math.isfinite(norm):
        raise ValueError("the round's update is not finite; nothing was released")
    if norm > bound:
        vec = vec * (bound / norm)
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"a weight in the sum is in (0, 1], got {weight}")
    vec = vec * weight
    if vec.size != q.dim:
        raise ValueError(f"the update has {vec.size} values; the job's quantization is for {q.dim}")
    sigma = q.site_sigma if plan.adds_noise_share else 0.0  # a local DP-SGD job's noise is already in
    noisy = quantize.quantize(vec, q) + discrete_gaussian.sample(q.dim, sigma)
    return np.asarray(masker(quantize.encode_mod(noisy)), dtype=np.int64)
