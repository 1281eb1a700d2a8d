"""The compute section of a site policy: what one job may cost this site per round, checked before accepting.

Everything here is computed from the job's spec and the site's record count, never by trying: a job whose rounds
would take 200,000 optimizer steps is refused at the offer, not discovered at the round's deadline. The time limit
is also enforced while training (`agent.rounds`): a round that runs past it is stopped and releases nothing.
"""

from __future__ import annotations

from pydantic import Field

from agent.record_plan import steps_per_round
from federation.jobs import JobSpec
from federation.schema import Frozen


class ComputePolicy(Frozen):
    max_local_steps_per_round: int = Field(
        default=10_000, ge=1, le=100_000_000,
        description="Most optimizer steps one round may take here: epochs × ceil(training records / batch size), "
                    "or the job's max_steps if fewer")
    max_examples_per_round: int = Field(
        default=10_000_000, ge=1, le=10**12,
        description="Most training examples one round may process here (epochs × training records, or max_steps × "
                    "batch size if fewer)")
    max_round_seconds: float = Field(
        default=3600.0, gt=0, le=86_400,
        description="Longest a round may train here: a job whose round_deadline_s is longer is refused, and "
                    "local training is stopped after this many seconds (nothing is released or charged)")


def examples_per_round(spec: JobSpec, n_train: int) -> int:
    hp = spec.hyperparameters
    full = hp.epochs * n_train
    return min(full, hp.max_steps * hp.batch_size) if hp.max_steps is not None else full


def time_refusals(policy: ComputePolicy, spec: JobSpec) -> list[str]:
    """From the spec alone, before any data is read."""
    if spec.round_deadline_s > policy.max_round_seconds:
        return [f"rounds may last {spec.round_deadline_s:g} s (round_deadline_s), longer than this site trains a "
                f"round ({policy.max_round_seconds:g} s)"]
    return []


def work_refusals(policy: ComputePolicy, spec: JobSpec, n_train: int) -> list[str]:
    """The work of one round on this site's `n_train` training records."""
    r = []
    hp = spec.hyperparameters
    steps = steps_per_round(hp, n_train)
    if steps > policy.max_local_steps_per_round:
        r.append(f"a round would take {steps} optimizer steps here ({hp.epochs} epochs × ceil({n_train} training "
                 f"records / batch size {hp.batch_size})), above this site's maximum "
                 f"{policy.max_local_steps_per_round}")
    examples = examples_per_round(spec, n_train)
    if examples > policy.max_examples_per_round:
        r.append(f"a round would process {examples} training examples here, above this site's maximum "
                 f"{policy.max_examples_per_round}")
    return r
