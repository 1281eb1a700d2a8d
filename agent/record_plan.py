"""A site's plan for a record-level job (the patient unit): its sampling rate, its steps, and the DP-SGD σ that
meets the job's per-patient target on its own data.

Each site plans for its own data: its sampling rate (batch size ÷ its records) and its number of steps differ, so
the σ meeting a job's per-patient target differs too, and only the site can compute it. Kept apart from the
training itself (`agent.dpsgd`) so that an agent deciding on an offer does not load Opacus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from federation.accounting import dpsgd_epsilon
from federation.calibration import dpsgd_noise
from federation.jobs import Hyperparameters, JobSpec


def steps_per_round(hp: Hyperparameters, n_train: int) -> int:
    """DP-SGD steps in one round: `epochs` expected passes over the records (capped by `max_steps`)."""
    steps = hp.epochs * math.ceil(n_train / hp.batch_size)
    return min(steps, hp.max_steps) if hp.max_steps is not None else steps


@dataclass(frozen=True)
class RecordPlan:
    """How one site runs DP-SGD for a job: what the accountant is told, and what a refusal quotes."""

    records: int
    sampling_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    clip_norm: float
    delta: float
    target_epsilon: float | None  # the job's per-patient target, when the σ was calibrated to it

    @property
    def steps(self) -> int:
        return self.steps_per_round * self.rounds

    def epsilon(self, rounds: int | None = None) -> float:
        """ε per patient record after `rounds` rounds (default: the whole job)."""
        done = self.rounds if rounds is None else rounds
        return dpsgd_epsilon(self.noise_multiplier, self.sampling_rate, self.steps_per_round * done, self.delta)

    def describe(self) -> str:
        return (f"{self.records} training records, sampling rate {self.sampling_rate:.3f}, {self.steps_per_round} "
                f"steps a round × {self.rounds} rounds = {self.steps} steps, DP-SGD σ {self.noise_multiplier:.3f}")


def record_plan(spec: JobSpec, n_train: int) -> RecordPlan:
    """This site's DP-SGD plan: its σ is the job's `record_noise_multiplier`, or the least that meets the job's
    per-patient `target_epsilon` over all its steps (`federation.calibration.dpsgd_noise`; raises ValueError when no
    σ can)."""
    p, hp = spec.privacy, spec.hyperparameters
    if p.unit != "record" or p.record_clip_norm is None:
        raise ValueError("the job is not record-level (privacy.unit: record)")
    if n_train <= 0:
        raise ValueError("record-level DP needs at least one training record")
    rate = min(1.0, hp.batch_size / n_train)
    per_round = steps_per_round(hp, n_train)
    if p.record_noise_multiplier is not None:
        sigma = p.record_noise_multiplier
    else:
        assert p.target_epsilon is not None  # PrivacySpec requires one of the two
        sigma = dpsgd_noise(p.target_epsilon, rate, per_round * spec.rounds, p.delta)
    return RecordPlan(n_train, rate, per_round, spec.rounds, sigma, p.record_clip_norm, p.delta, p.target_epsilon)
