"""A job's rounds: open, announce, close at quorum or deadline, then the next one or the end.

The half of the round engine that moves a job from state to state; `aggregator.engine.RoundEngine` adds what calls
it (submission, recovery, operator actions, site answers, uploads). Every transition is written to the store before
it is announced, and what follows a round or a job (tracking, reports) is posted, never awaited.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

import structlog

from aggregator.blobs import BlobStore
from aggregator.db import Db
from aggregator.jobevents import JobEnded, JobEvent, RoundClosed
from aggregator.leases import FOLLOWUP_TTL_S, LeaseSettings
from aggregator.metrics import AggregatorMetrics
from aggregator.runner import ACTIVE, JobRunner, quorum_size, weighted
from aggregator.store import RoundRow, UpdateRow
from aggregator.store.leases import FencedOut
from aggregator.validation import Rejection
from federation import topics
from federation.faults import failpoint
from federation.messages import EvalMetrics, RoundTask
from federation.schema import Frozen
from federation.tensors import encode

log = structlog.get_logger(__name__)


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None: ...


Signer = Callable[[Frozen], bytes]
CLOSE_RETRY_S = 2.0  # after a failed attempt to close a round
CLOSED_TTL_S = 30 * 86_400.0  # agents act on a "closed" notice even when late; the expiry is informative


def nonce() -> str:
    return secrets.token_hex(16)


class RoundTransitions(ABC):
    """The engine's state machine per job, and the dependencies every part of the engine uses."""

    def __init__(
        self,
        db: Db,
        blobs: BlobStore,
        publisher: Publisher,
        signer: Signer,
        metrics: AggregatorMetrics,
        post: Callable[[JobEvent], None] | None = None,
        lease: LeaseSettings | None = None,
    ) -> None:
        """`lease`: this replica's identity for job leases (None: no leases, a writer alone by construction)."""
        self._db = db
        self._store = db.store
        self._blobs = blobs
        self._pub = publisher
        self._sign = signer
        self._metrics = metrics
        self._runners: dict[str, JobRunner] = {}
        # Uploads being validated and written at once (outside their job's lock): bounds the memory of decoded
        # updates in flight.
        self._ingest = asyncio.Semaphore(4)
        # Told, without waiting, that a round closed or a job ended once that is durable (reports, tracking).
        self._post = post or (lambda _event: None)
        self._lease = lease

    def lose(self, job_id: str, reason: str) -> None:
        """Stop writing `job_id` at once: its lease is gone (another replica may be its writer now). What was
        acknowledged is durable; what was in flight fails its fence and is retried by its sender."""
        runner = self._runners.pop(job_id, None)
        if runner is None:
            return
        for timer in (runner.timer, runner.secure_timer):
            if timer is not None:
                timer.cancel()
        runner.state = "lost"
        log.warning("lease_lost", job=job_id, reason=reason)

    # ---------------------------------------------------------------- round transitions
    async def _maybe_start(self, runner: JobRunner) -> None:
        if all(d != "offered" for d in runner.decisions.values()):
            await self._start_or_fail(runner)

    async def _accept_deadline(self, runner: JobRunner) -> None:
        if runner.state == "offered":
            await self._start_or_fail(runner)

    async def _start_or_fail(self, runner: JobRunner) -> None:
        if len(runner.active_sites) >= runner.spec.min_sites:
            await self._open(runner, 1, "train")
            return
        decisions = await self._db(self._store.decisions, runner.job_id)  # with reasons, once, for the message
        refused = "; ".join(
            f"{d.site}: {', '.join(d.reasons) or d.decision}" for d in decisions if d.site not in runner.active_sites
        )
        await self._end(
            runner, "failed",
            f"only {len(runner.active_sites)} of {len(decisions)} sites accepted (min_sites "
            f"{runner.spec.min_sites}); {refused}",
        )

    async def _open(self, runner: JobRunner, rnd: int, kind: str) -> None:
        now = time.time()
        deadline = now + runner.spec.round_deadline_s
        await self._db(self._store.open_round, runner.job_id, rnd, kind, runner.model_sha, now, deadline,
                       fence=runner.fence)
        runner.state = "running"
        runner.round = RoundRow(runner.job_id, rnd, kind, "open", now, deadline, None, runner.model_sha, None, 0, 0,
                                None)
        runner.reported = set()
        runner.strategy.reset(runner.global_weights)
        if kind == "train" and runner.spec.secure_aggregation is not None:
            self._secure_open(runner, rnd)
        self._announce(runner, runner.round)
        self._arm(runner, runner.spec.round_deadline_s, self._round_deadline)
        log.info("round_opened", job=runner.job_id, round=rnd, kind=kind, sites=len(runner.active_sites))

    def _announce(self, runner: JobRunner, rnd: RoundRow) -> None:
        task = self._sign(
            RoundTask(
                kind=rnd.kind,  # type: ignore[arg-type]
                job_id=runner.job_id, round=rnd.round, model_sha256=rnd.model_in, deadline=rnd.deadline,
                share_keys={s: runner.share_keys[s] for s in runner.secure.participants}
                if runner.secure is not None and rnd.kind == "train" else None,
                issued_at=time.time(), expires_at=rnd.deadline, nonce=nonce(),
            )
        )
        for site in sorted(runner.active_sites):
            self._pub.publish(topics.tasks(site, runner.job_id), task, retain=True)

    async def _maybe_close(self, runner: JobRunner) -> None:
        r = runner.round
        if r is None or r.state != "open":
            return
        if runner.secure is not None and r.kind == "train":
            await self._secure_progress(runner)
        elif runner.active_sites and len(runner.reported & runner.active_sites) >= quorum_size(runner):
            await self._close(runner, r)
        elif len(runner.active_sites) < runner.spec.min_sites and r.kind == "train":
            await self._end(
                runner, "failed",
                f"round {r.round}: only {len(runner.active_sites)} sites still take part (min_sites "
                f"{runner.spec.min_sites})",
            )

    async def _round_deadline(self, runner: JobRunner) -> None:
        r = runner.round
        if runner.state != "running" or r is None or r.state != "open":
            return
        if runner.secure is not None and r.kind == "train":
            await self._secure_deadline(runner)
            return
        missing = sorted(runner.active_sites - runner.reported)
        log.warning("round_deadline", job=runner.job_id, round=r.round, reported=len(runner.reported),
                    missing=missing)
        if r.kind == "evaluate" or len(runner.reported) >= runner.spec.min_sites:
            await self._close(runner, r)
        else:
            await self._end(
                runner, "failed",
                f"round {r.round} reached its deadline with {len(runner.reported)} of min_sites "
                f"{runner.spec.min_sites} updates; missing: {', '.join(missing)}",
            )

    async def _close(self, runner: JobRunner, r: RoundRow) -> None:
        """Close the round; when that fails (the blob store or the database is unreachable), try again shortly:
        a round whose updates are all in must never stay open for want of a caller. Not raised to the caller: what
        it acknowledged is durable already."""
        try:
            await self._close_once(runner, r)
        except FencedOut:
            raise
        except Exception:
            log.exception("round_close_failed", job=runner.job_id, round=r.round, retry_in_s=CLOSE_RETRY_S)
            self._arm(runner, CLOSE_RETRY_S, self._retry_close)

    async def _retry_close(self, runner: JobRunner) -> None:
        r = runner.round
        if r is None or r.state != "open":
            return
        if r.kind == "train" and len(runner.reported) < runner.spec.min_sites:
            # Not closeable yet (e.g. the failure came before quorum): wait for the deadline again.
            self._arm(runner, max(r.deadline - time.time(), 0.0), self._round_deadline)
            return
        await self._close(runner, r)

    async def _close_once(self, runner: JobRunner, r: RoundRow) -> None:
        with structlog.contextvars.bound_contextvars(job=runner.job_id, round=r.round):
            if runner.timer is not None and runner.timer is not asyncio.current_task():
                runner.timer.cancel()
            model_out: str | None = None
            n_samples, loss = 0, None
            ups: list[UpdateRow] = []
            if r.kind == "train":
                ups = await self._db(self._store.updates, runner.job_id, r.round)
                n_samples = sum(u.num_samples for u in ups)
                loss = sum(u.train_loss * u.num_samples for u in ups) / max(n_samples, 1)
                new_weights = await asyncio.to_thread(runner.strategy.apply, runner.global_weights)
                model_out = await self._db(self._blobs.put, encode(new_weights), "model")
                failpoint("finalize_after_blob")
            now = time.time()
            await self._db(
                self._store.close_round, runner.job_id, r.round, model_out, len(runner.reported), n_samples, loss, now,
                fence=runner.fence,
            )
            failpoint("finalize_after_commit")
            runner.round = replace(r, state="closed", closed_at=now, model_out=model_out,
                                   n_sites=len(runner.reported), n_samples=n_samples, train_loss=loss)
            self._metrics.round_duration.labels(r.kind).observe(now - r.started_at)
            if r.kind == "train":
                assert model_out is not None
                runner.global_weights, runner.model_sha = new_weights, model_out
                self._metrics.rounds_completed.labels(runner.job_id).inc()
            evals = (await self._db(self._store.evaluations, runner.job_id, r.round - 1)).get(r.round - 1, {})
            self._global_gauges(runner, evals)
            log.info("round_closed", kind=r.kind, sites=len(runner.reported), samples=n_samples,
                     duration_s=round(now - r.started_at, 3))
            self._post(RoundClosed(runner.job_id, runner.spec, r.round, tuple(ups), evals))
            await self._after_close(runner, runner.round)

    async def _after_close(self, runner: JobRunner, r: RoundRow) -> None:
        if runner.paused and r.kind == "train":
            log.info("job_paused_after_round", job=runner.job_id, round=r.round)
            return
        if r.kind == "evaluate":
            await self._end(runner, "finished", "")
        elif r.round < runner.spec.rounds:
            await self._open(runner, r.round + 1, "train")
        else:
            await self._open(runner, r.round + 1, "evaluate")

    async def _end(self, runner: JobRunner, state: str, reason: str) -> None:
        """End the job: durable first, then the sites are told, then the follow-ups are posted (not awaited)."""
        if runner.ended:
            return
        for timer in (runner.timer, runner.secure_timer):
            if timer is not None and timer is not asyncio.current_task():
                timer.cancel()
        await self._db(self._store.set_job_state, runner.job_id, state, reason, time.time(), fence=runner.fence)
        runner.state = state
        if runner.fence is not None and self._lease is not None:
            # This replica writes the job's report too: claimed so that no other replica does it as well.
            await self._db(self._store.acquire_lease, self._lease.followup_key(runner.job_id), self._lease.holder,
                           self._lease.address, FOLLOWUP_TTL_S)
            await self._db(self._store.release_lease, runner.fence)
        now = time.time()
        closed = self._sign(
            RoundTask(kind="closed", job_id=runner.job_id, round=runner.round.round if runner.round else 0,
                      state=state, reason=reason or None, issued_at=now, expires_at=now + CLOSED_TTL_S,
                      nonce=nonce())
        )
        for site in runner.spec.sites:
            self._pub.publish(topics.tasks(site, runner.job_id), closed, retain=True)
            self._pub.publish(topics.offers(site, runner.job_id), b"", retain=True)  # clears the retained offer
        self._runners.pop(runner.job_id, None)
        (log.info if state == "finished" else log.warning)("job_ended", job=runner.job_id, state=state, reason=reason)
        await self._refresh_job_gauge()
        self._post(JobEnded(runner.job_id, state))

    # ---------------------------------------------------------------- secure aggregation (SecureSteps)
    @abstractmethod
    def _secure_open(self, runner: JobRunner, rnd: int) -> None:
        """A secure job's train round opened: start its protocol state and share window."""

    @abstractmethod
    async def _secure_progress(self, runner: JobRunner) -> None:
        """Move a secure round on as far as what is stored allows (instead of closing at quorum)."""

    @abstractmethod
    async def _secure_deadline(self, runner: JobRunner) -> None:
        """A secure round's deadline (instead of the plain one)."""

    # ---------------------------------------------------------------- helpers
    async def _runner_for(self, site: str, job_id: str) -> JobRunner:
        runner = self._runners.get(job_id)
        if runner is None:
            job = await self._db(self._store.get_job, job_id)
            if job is None:
                raise Rejection("unknown_job", f"no job {job_id!r}", 404)
            if job.state in ACTIVE:  # another replica writes it now (or will, once its lease is taken): retry
                raise Rejection("writer_changed", f"job {job_id} is written by another replica now; retry", 503)
            raise Rejection("job_not_running", f"job {job_id} is {job.state}", 409)
        if site not in runner.active_sites:
            raise Rejection("site_not_in_job", f"site {site!r} has not accepted job {job_id}", 403)
        return runner

    @staticmethod
    def _current(runner: JobRunner, rnd: int, kind: str) -> RoundRow:
        """The open round `rnd` of `kind`, from the runner's own record of it; raises `Rejection` otherwise."""
        if runner.state == "lost":  # its lease went while this request waited: the new writer takes the retry
            raise Rejection("writer_changed", f"job {runner.job_id} is written by another replica now; retry", 503)
        if runner.state == "running" and runner.round is None:
            # Being recovered (a takeover or a restart: its round is read back from the store) or about to open
            # its first round: a moment, not a refusal; the caller retries (a 409 here lost an upload for good).
            raise Rejection("job_recovering", f"job {runner.job_id} is resuming its round; retry", 503)
        if runner.state != "running" or runner.round is None:
            raise Rejection("job_not_running", f"job {runner.job_id} is {runner.state}", 409)
        current = runner.round
        if rnd < current.round:
            raise Rejection("late_update", f"round {rnd} is closed; the job is in round {current.round}", 409)
        if rnd > current.round:
            raise Rejection("round_not_open", f"round {rnd} has not started; current round {current.round}", 409)
        if current.state != "open" or current.kind != kind:
            raise Rejection("round_not_open", f"round {rnd} is not an open {kind} round", 409)
        return current

    def _arm(self, runner: JobRunner, delay: float, fn: Callable[[JobRunner], Awaitable[None]],
             slot: str = "timer") -> None:
        """Call `fn(runner)` under the job's lock after `delay`, replacing what the runner's `slot` (its round
        timer, or the secure round's share window: `secure_timer`) was waiting for."""
        earlier = getattr(runner, slot)
        if earlier is not None:
            earlier.cancel()

        async def fire() -> None:
            await asyncio.sleep(delay)
            async with runner.lock:
                setattr(runner, slot, None)
                if not runner.ended:
                    try:
                        await fn(runner)
                    except FencedOut as exc:
                        self.lose(runner.job_id, str(exc))

        setattr(runner, slot, asyncio.create_task(fire()))

    def _global_gauges(self, runner: JobRunner, evals: dict[str, EvalMetrics]) -> None:
        if not evals:
            return
        g = weighted(evals)
        if g.auc is not None:
            self._metrics.global_auc.labels(runner.job_id).set(g.auc)
        if g.loss is not None:
            self._metrics.global_loss.labels(runner.job_id).set(g.loss)

    async def _refresh_job_gauge(self) -> None:
        counts = await self._db(self._store.count_jobs)
        for state in ("offered", "running", "finished", "failed", "cancelled"):
            self._metrics.jobs.labels(state).set(counts.get(state, 0))
