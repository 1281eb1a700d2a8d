"""The agent's privacy engine: the one place an update becomes releasable.

It clips and noises the round delta (`federation.privacy`), accounts the spend (RDP accountant, for the
guarantee the job declares), refuses to exceed the dataset's budget, and writes spend and released bytes to
the durable release log *before* returning. Only this module can construct a `PrivatizedUpdate`, and the
egress gate sends nothing else.
"""

from __future__ import annotations

import math
import secrets
import time

import numpy as np

from agent.state import AgentState, Release
from federation.jobs import JobSpec
from federation.messages import EvalMetrics, UpdateEnvelope
from federation.models import Weights
from federation.privacy import epsilon_for, privatize
from federation.tensors import encode, sha256_hex

_TOKEN = object()
DAY = 86_400.0


class AlreadyReleasedError(RuntimeError):
    """This round already released an update; releasing another would spend privacy twice."""


class BudgetExhaustedError(RuntimeError):
    """Releasing this round would take the dataset past its privacy budget."""


def job_epsilon(spec: JobSpec, n_train: int | None, rounds: int | None = None) -> float:
    """ε the job spends at this site over `rounds` (default: all), under the guarantee it declares:
    update-level (a site's whole contribution) or record-level (DP-SGD, one patient record)."""
    p = spec.privacy
    rounds = spec.rounds if rounds is None else rounds
    if p.unit == "record":
        from agent.dpsgd import record_epsilon

        return record_epsilon(spec, n_train, rounds)
    return epsilon_for(p.noise_multiplier, rounds, p.delta)


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
    def __init__(self, state: AgentState, rng: np.random.Generator | None = None) -> None:
        self._state = state
        # Noise must be unpredictable to the aggregator: seed from the OS's CSPRNG unless a test pins it.
        self._rng = rng or np.random.default_rng(secrets.randbits(128))

    def privatize(
        self, site: str, job_id: str, rnd: int, spec: JobSpec, delta: Weights, num_samples: int,
        evaluation: EvalMetrics | None, train_loss: float, budget: float, budget_since: float = 0.0,
        share_tracking: bool = True,
    ) -> PrivatizedUpdate:
        """Clip, noise, account and log one round's update. `budget` is the dataset's total ε (per period
        starting at `budget_since`); a release that would exceed it raises `BudgetExhaustedError`."""
        if self._state.release(job_id, rnd) is not None:
            raise AlreadyReleasedError(f"round {rnd} of job {job_id} already released an update")
        p = spec.privacy
        released = self._state.releases_for(job_id) + 1
        eps = job_epsilon(spec, num_samples, released)
        others = self._state.spent(spec.dataset.name, budget_since, exclude_job=job_id)
        if others + eps > budget:
            raise BudgetExhaustedError(
                f"round {rnd} would bring ε on {spec.dataset.name!r} to {others + eps:.2f}, past the budget {budget}"
            )
        noisy, _ = privatize(delta, p.clip_norm, p.noise_multiplier, self._rng)
        payload = encode(noisy)
        reported = eps if math.isfinite(eps) else None
        envelope = UpdateEnvelope(
            job_id=job_id, round=rnd, site=site, num_samples=num_samples, sha256=sha256_hex(payload),
            evaluation=evaluation, train_loss=train_loss, epsilon=reported, share_tracking=share_tracking,
        )
        self._state.record_release(
            Release(job_id, rnd, spec.dataset.name, p.noise_multiplier, eps, payload, envelope.model_dump_json(),
                    sent=False)
        )
        return PrivatizedUpdate(_TOKEN, job_id, rnd, payload, envelope)

    def pending(self, job_id: str, rnd: int) -> PrivatizedUpdate | None:
        """The update already released for this round (to resend after a crash), if any."""
        r = self._state.release(job_id, rnd)
        if r is None:
            return None
        return PrivatizedUpdate(_TOKEN, job_id, rnd, r.payload, UpdateEnvelope.model_validate_json(r.envelope))

    def spent(self, job_id: str, spec: JobSpec, n_train: int | None) -> float | None:
        """ε this job has spent here so far; None when it runs without noise (no guarantee)."""
        eps = job_epsilon(spec, n_train, self._state.releases_for(job_id))
        return eps if math.isfinite(eps) else None
