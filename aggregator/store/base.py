"""The aggregator's durable state as one interface: the rows it holds and the calls the round engine makes.

Every mutating method is one transaction, so a crash leaves either the old or the new state, never a mix. Calls are
synchronous: the engine runs writes on one dedicated thread (`aggregator.engine.Db`), which also makes the store
single-writer, and API reads on a second connection of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from federation.jobs import JobSpec

if TYPE_CHECKING:
    from aggregator.store.leases import Fence, Lease
    from aggregator.store.quarantine import Quarantined
from federation.messages import EvalMetrics


@dataclass(frozen=True)
class JobRow:
    job_id: str
    spec: JobSpec
    state: str  # offered | running | finished | failed | cancelled
    round: int  # current round; rounds+1 is the final evaluation
    model_sha: str  # current global model
    reason: str
    created_at: float
    updated_at: float
    requester: str
    paused: bool = False


@dataclass(frozen=True)
class RoundRow:
    job_id: str
    round: int
    kind: str  # train | evaluate
    state: str  # open | closed
    started_at: float
    deadline: float
    closed_at: float | None
    model_in: str
    model_out: str | None
    n_sites: int
    n_samples: int
    train_loss: float | None


@dataclass(frozen=True)
class UpdateRow:
    job_id: str
    round: int
    site: str
    sha256: str
    num_samples: int
    train_loss: float
    epsilon: float | None
    received_at: float
    share_tracking: bool = True
    # ε per unit the site's mechanisms protect (record: per patient; site: per hospital), as its envelope said.
    privacy: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True)
class SiteDecision:
    site: str
    decision: str  # offered | accepted | refused | stopped
    reasons: list[str]
    epsilon_planned: float | None
    at: float


class StateStore(ABC):
    """Every write to a job's state takes the `fence` of the job's lease (`aggregator.store.leases`): with it the
    write is refused (`FencedOut`) unless this replica still holds the lease with that token.

    The aggregator's durable state. Implementations must pass `tests/unit/test_store.py`."""

    @abstractmethod
    def create_job(
        self, job_id: str, spec: JobSpec, model_sha: str, now: float, requester: str = "",
        lease: tuple[str, str, float] | None = None,
    ) -> int | None:
        """Store a new job (offered to its sites); with `lease` (holder, address, ttl) its creator also takes the
        job's lease in the same transaction, and the fencing token is returned."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRow | None: ...

    @abstractmethod
    def list_jobs(self, states: tuple[str, ...] | None = None) -> list[JobRow]: ...

    @abstractmethod
    def count_jobs(self) -> dict[str, int]:
        """How many jobs are in each state (states without a job are absent)."""

    @abstractmethod
    def set_job_state(self, job_id: str, state: str, reason: str, now: float, fence: Fence | None = None) -> None:
        """Move a job to `state`; an ended state (finished, failed, cancelled) also records a follow-up (report,
        tracking) in the same transaction, kept until `followup_done`."""

    @abstractmethod
    def followups(self) -> list[tuple[str, str]]:
        """(job, state) of every ended job whose follow-up is not done yet, oldest first."""

    @abstractmethod
    def followup_done(self, job_id: str) -> None: ...

    @abstractmethod
    def followup_pending(self, job_id: str) -> bool: ...

    @abstractmethod
    def set_paused(self, job_id: str, paused: bool, now: float, fence: Fence | None = None) -> None: ...

    @abstractmethod
    def record_decision(self, job_id: str, d: SiteDecision, fence: Fence | None = None) -> None: ...

    @abstractmethod
    def decisions(self, job_id: str) -> list[SiteDecision]: ...

    @abstractmethod
    def invited(self, job_id: str, site: str) -> bool:
        """Whether `site` was offered job `job_id`."""

    @abstractmethod
    def open_round(
        self, job_id: str, rnd: int, kind: str, model_in: str, now: float, deadline: float, fence: Fence | None = None,
    ) -> None:
        """Start round `rnd` (idempotent) and move the job to it; the job becomes `running`."""

    @abstractmethod
    def get_round(self, job_id: str, rnd: int) -> RoundRow | None: ...

    @abstractmethod
    def rounds(self, job_id: str) -> list[RoundRow]: ...

    @abstractmethod
    def add_update(self, u: UpdateRow, evaluation: EvalMetrics | None, fence: Fence | None = None) -> bool:
        """Insert an acknowledged update (and the evaluation it carried); False if (job, round, site) exists."""

    @abstractmethod
    def get_update(self, job_id: str, rnd: int, site: str) -> UpdateRow | None: ...

    @abstractmethod
    def site_spend(self, job_id: str) -> dict[str, dict[str, float | None]]:
        """Each site's latest reported ε on the job, per unit."""

    @abstractmethod
    def updates(self, job_id: str, rnd: int | None = None) -> list[UpdateRow]:
        """The updates of one round, or of every round (by round, then site) when `rnd` is None."""

    @abstractmethod
    def close_round(
        self, job_id: str, rnd: int, model_out: str | None, n_sites: int, n_samples: int,
        train_loss: float | None, now: float, fence: Fence | None = None,
    ) -> None:
        """Close round `rnd` and record its output model as the job's global model, in one transaction."""

    @abstractmethod
    def add_evaluation(
        self, job_id: str, version: int, site: str, m: EvalMetrics, fence: Fence | None = None,
    ) -> bool: ...

    @abstractmethod
    def evaluations(self, job_id: str, version: int | None = None) -> dict[int, dict[str, EvalMetrics]]:
        """Per model version, each site's metrics; only `version`'s when it is given."""

    @abstractmethod
    def add_rejection(
        self, job_id: str | None, rnd: int | None, site: str | None, reason: str, detail: str, now: float
    ) -> None: ...

    @abstractmethod
    def rejections(self, job_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]: ...

    @abstractmethod
    def register_model(self, sha: str, job_id: str, version: int) -> None: ...

    @abstractmethod
    def is_model(self, sha: str) -> bool: ...

    @abstractmethod
    def upsert_sites(self, rows: list[tuple[str, str, float, dict[str, Any]]]) -> None:
        """(site, state, at, info) of each site, in one transaction."""

    @abstractmethod
    def sites(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def site_decisions(self, site: str | None = None) -> list[dict[str, Any]]:
        """Each site's decision on each job offered to it, newest first, with the job's state and the ε the
        site reported with its latest update in that job (None before its first update), in `epsilon_unit`."""

    # audit heads (aggregator.store.audit_heads)
    @abstractmethod
    def record_audit_heads(self, rows: list[tuple[str, int, str, float, int]]) -> None:
        """(site, seq, sha256, at, new conflicts) per site: a head only moves forward; conflicts add up."""

    @abstractmethod
    def audit_heads(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def audit_head(self, site: str) -> dict[str, Any] | None: ...

    # secure aggregation (aggregator.store.secagg)
    @abstractmethod
    def put_secagg(self, job_id: str, rnd: int, site: str, kind: str, body: str, at: float,
                   fence: Fence | None = None) -> str:
        """Store a protocol message once; return the stored body (the first one, on a repeat)."""

    @abstractmethod
    def secagg_rows(self, job_id: str, rnd: int, kind: str) -> dict[str, str]: ...

    @abstractmethod
    def drop_secagg_round(self, job_id: str, rnd: int, fence: Fence | None = None) -> None: ...

    # leases (aggregator.store.leases)
    @abstractmethod
    def db_now(self) -> float: ...

    @abstractmethod
    def acquire_lease(self, job_id: str, holder: str, address: str, ttl_s: float) -> int | None: ...

    @abstractmethod
    def renew_leases(self, fences: list[Fence], ttl_s: float) -> set[str]: ...

    @abstractmethod
    def release_lease(self, fence: Fence) -> None: ...

    @abstractmethod
    def hand_over_lease(self, fence: Fence) -> None: ...

    @abstractmethod
    def lease(self, job_id: str) -> Lease | None: ...

    @abstractmethod
    def takeable_jobs(self, holder: str) -> list[str]: ...

    @abstractmethod
    def quarantine_job(self, job_id: str, now: float, fence: Fence | None = None) -> list[Quarantined]:
        """Move every row of a running job that fails `checks` to the quarantine, failing the job with the reason;
        see `aggregator.store.quarantine`."""

    @abstractmethod
    def quarantine_sites(self, now: float) -> list[Quarantined]: ...

    @abstractmethod
    def quarantined(self, limit: int = 1000) -> list[dict[str, Any]]: ...

    @abstractmethod
    def close(self) -> None: ...


