"""The round engine: drives each job through offer → rounds → final evaluation, one writer per job.

Every state change is written to the store before anything is announced, so a restarted aggregator
(`recover`) continues from the store alone: acknowledged updates are never lost, finished rounds never redone.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np
import structlog

from aggregator.blobs import BlobStore
from aggregator.metrics import AggregatorMetrics
from aggregator.privacy_units import spend_by_unit
from aggregator.store import JobRow, SiteDecision, StateStore, UpdateRow
from aggregator.strategies import Strategy, make_strategy
from aggregator.validation import Rejection, check_update
from federation import topics
from federation.faults import failpoint
from federation.jobs import JobSpec
from federation.messages import (
    EvalMetrics,
    EvaluationReport,
    JobOffer,
    RoundTask,
    SiteEvent,
    SiteStatus,
    UpdateEnvelope,
)
from federation.models import Weights, build_model, get_weights
from federation.schema import Frozen
from federation.tensors import decode, encode

log = structlog.get_logger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
ACTIVE = ("offered", "running")


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None: ...


Signer = Callable[[Frozen], bytes]
CLOSED_TTL_S = 30 * 86_400.0  # agents act on a "closed" notice even when late; the expiry is informative


def nonce() -> str:
    return secrets.token_hex(16)


class Db:
    """Runs store and blob calls on one dedicated thread: the event loop never waits on fsync."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class JobRunner:
    """In-memory state of one active job; everything here can be rebuilt from the store."""

    job_id: str
    spec: JobSpec
    global_weights: Weights
    strategy: Strategy
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active_sites: set[str] = field(default_factory=set)
    timer: asyncio.Task[None] | None = None
    round_started: float = 0.0


def new_job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"{slug}-{secrets.token_hex(4)}"


def initial_weights(spec: JobSpec) -> Weights:
    model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden, seed=spec.seed)
    weights = get_weights(model)
    if spec.model.init == "seeded":
        return weights
    zeros = {k: np.zeros_like(v) for k, v in weights.items()}
    if spec.model.prior:
        # A model without hidden layers has one (1, inputs) weight matrix, its columns in encoded-input order.
        (name,) = [k for k, v in zeros.items() if v.ndim == 2]
        index = {n: i for i, n in enumerate(spec.features.encoded_names())}
        for feature, w in spec.model.prior.items():
            zeros[name][0, index[feature]] = w
    return zeros


class RoundEngine:
    def __init__(
        self,
        store: StateStore,
        blobs: BlobStore,
        publisher: Publisher,
        signer: Signer,
        metrics: AggregatorMetrics,
        on_job_event: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._pub = publisher
        self._sign = signer
        self._metrics = metrics
        self._db = Db()
        self._runners: dict[str, JobRunner] = {}
        # Called with (job_id, event) after "round_closed" and after the job ends ("finished", "failed",
        # "cancelled"), once the state is durable: reports and experiment tracking hang off it.
        self._on_job_event = on_job_event
        # Each site's last known state, for the sites-online gauge: a heartbeat then costs one row write, not a
        # scan of every site (thousands of sites heartbeat every few seconds). Loaded from the store at recover.
        self._site_states: dict[str, str] = {}

    @property
    def db(self) -> Db:
        return self._db

    # ---------------------------------------------------------------- lifecycle
    async def submit(self, spec: JobSpec, requester: str) -> str:
        job_id = new_job_id(spec.name)
        weights = initial_weights(spec)
        sha = await self._db(self._blobs.put, encode(weights))
        await self._db(self._store.create_job, job_id, spec, sha, time.time(), requester)
        runner = JobRunner(job_id, spec, weights, make_strategy(spec))
        self._runners[job_id] = runner
        self._offer(runner, requester, time.time(), spec.sites)
        self._arm(runner, spec.accept_deadline_s, self._accept_deadline)
        log.info("job_submitted", job=job_id, sites=spec.sites, rounds=spec.rounds, requester=requester)
        await self._refresh_job_gauge()
        return job_id

    def _offer(self, runner: JobRunner, requester: str, created_at: float, sites: list[str]) -> None:
        """Publish the signed offer (retained) to each site; it expires at the job's accept deadline."""
        spec = runner.spec
        offer = self._sign(JobOffer(job_id=runner.job_id, spec=spec, requester=requester, issued_at=time.time(),
                                    expires_at=created_at + spec.accept_deadline_s, nonce=nonce()))
        for site in sites:
            self._pub.publish(topics.offers(site, runner.job_id), offer, retain=True)

    async def recover(self) -> None:
        """Resume every unfinished job from the store after a (re)start."""
        for row in await self._db(self._store.sites):
            self._site_seen(row["site"], row["state"], row["at"])
        for job in await self._db(self._store.list_jobs, ACTIVE):
            weights = decode(await self._db(self._blobs.get, job.model_sha))
            runner = JobRunner(
                job.job_id, job.spec, weights, make_strategy(job.spec)
            )
            decisions = await self._db(self._store.decisions, job.job_id)
            runner.active_sites = {d.site for d in decisions if d.decision == "accepted"}
            self._runners[job.job_id] = runner
            async with runner.lock:
                if job.state == "offered":
                    # A crash between the commit and the broker's acknowledgement may have lost the offers:
                    # publish them again to the sites that have not answered (agents answer a repeat the same).
                    answered = {d.site for d in decisions if d.decision in ("accepted", "refused")}
                    self._offer(runner, job.requester, job.created_at, [s for s in job.spec.sites if s not in answered])
                    remaining = job.created_at + job.spec.accept_deadline_s - time.time()
                    self._arm(runner, max(remaining, 0.0), self._accept_deadline)
                    await self._maybe_start(runner)
                else:
                    await self._resume_round(runner, job)
            log.info("job_recovered", job=job.job_id, state=job.state, round=job.round)
        await self._refresh_job_gauge()

    async def _resume_round(self, runner: JobRunner, job: JobRow) -> None:
        rnd = await self._db(self._store.get_round, job.job_id, job.round)
        if rnd is None:
            return
        runner.round_started = rnd.started_at
        if rnd.state == "closed":  # crashed after closing, before opening the next one
            await self._after_close(runner, job.round, rnd.kind)
            return
        runner.strategy.reset(runner.global_weights)
        if rnd.kind == "train":
            for u in await self._db(self._store.updates, job.job_id, job.round):
                runner.strategy.add(decode(await self._db(self._blobs.get, u.sha256)), u.num_samples)
        self._announce(runner, rnd.kind, job.round, rnd.deadline, rnd.model_in)
        self._arm(runner, max(rnd.deadline - time.time(), 0.0), self._round_deadline)
        await self._maybe_close(runner, job.round)

    def _running(self, job_id: str) -> JobRunner:
        """The runner of a running job; KeyError (which the API answers with 409) when there is none."""
        runner = self._runners.get(job_id)
        if runner is None:
            raise KeyError(job_id)
        return runner

    async def cancel(self, job_id: str, reason: str = "cancelled by operator") -> None:
        runner = self._running(job_id)
        async with runner.lock:
            await self._end(runner, "cancelled", reason)

    async def pause(self, job_id: str) -> None:
        """Let the current round finish, then start no new one until `resume`."""
        runner = self._running(job_id)
        async with runner.lock:
            await self._db(self._store.set_paused, job_id, True, time.time())
            log.info("job_paused", job=job_id)

    async def resume(self, job_id: str) -> None:
        runner = self._running(job_id)
        async with runner.lock:
            await self._db(self._store.set_paused, job_id, False, time.time())
            log.info("job_resumed", job=job_id)
            job = await self._db(self._store.get_job, job_id)
            rnd = await self._db(self._store.get_round, job_id, job.round) if job else None
            if job is not None and job.state == "running" and rnd is not None and rnd.state == "closed":
                await self._after_close(runner, job.round, rnd.kind)

    async def shutdown(self) -> None:
        for r in self._runners.values():
            if r.timer is not None:
                r.timer.cancel()
        self._db.shutdown()

    # ---------------------------------------------------------------- site messages
    async def on_site_event(self, event: SiteEvent) -> None:
        runner = self._runners.get(event.job_id)
        bound = structlog.contextvars.bound_contextvars(job=event.job_id, site=event.site)
        with bound:
            if runner is None or event.site not in runner.spec.sites:
                log.info("site_event_ignored", kind=event.kind, reason="unknown job or site not in job")
                return
            if event.kind == "error":  # the site stays in the job; the operator sees why a round went missing
                log.warning("site_error", round=event.round, reasons=event.reasons)
                await self._db(self._store.add_rejection, event.job_id, event.round, event.site, "site_error",
                               "; ".join(event.reasons), event.at)
                return
            async with runner.lock:
                decision = {"accepted": "accepted", "refused": "refused"}.get(event.kind, "stopped")
                current = {d.site: d for d in await self._db(self._store.decisions, event.job_id)}
                if decision == "accepted" and current[event.site].decision != "offered":
                    return  # a repeated answer (e.g. after an agent restart) changes nothing
                await self._db(
                    self._store.record_decision, event.job_id,
                    SiteDecision(event.site, decision, event.reasons, event.epsilon_planned, event.at),
                )
                log.info("site_decision", decision=decision, reasons=event.reasons)
                if decision == "refused":
                    self._metrics.site_refusals.labels(event.site).inc()
                if decision == "accepted":
                    runner.active_sites.add(event.site)
                else:
                    runner.active_sites.discard(event.site)
                job = await self._db(self._store.get_job, event.job_id)
                if job is None or job.state not in ACTIVE:
                    return
                if job.state == "offered":
                    await self._maybe_start(runner)
                else:
                    await self._maybe_close(runner, job.round)

    async def on_site_status(self, status: SiteStatus) -> None:
        """A heartbeat, or the last will the broker publishes when an agent's connection drops."""
        reason = None if status.state == "online" else "connection lost (last will)"
        await self._db(
            self._store.upsert_site, status.site, status.state, status.at,
            {"active_jobs": status.active_jobs, "version": status.version, "offline_reason": reason},
        )
        self._site_seen(status.site, status.state, status.at)

    async def sweep_sites(self, timeout_s: float, now: float | None = None) -> list[str]:
        """Mark online sites whose last heartbeat is older than `timeout_s` offline (a hung agent or a network
        partition sends no last will); returns the sites marked."""
        now = time.time() if now is None else now
        marked = []
        for row in await self._db(self._store.sites):
            if row["state"] == "online" and now - row["at"] > timeout_s:
                info = {k: v for k, v in row.items() if k not in ("site", "state", "at")}
                info["offline_reason"] = f"no heartbeat for {now - row['at']:.0f} s (timeout {timeout_s:g} s)"
                await self._db(self._store.upsert_site, row["site"], "offline", row["at"], info)
                self._site_seen(row["site"], "offline", row["at"])
                log.warning("site_offline", site=row["site"], reason=info["offline_reason"])
                marked.append(row["site"])
        return marked

    async def run_site_sweeper(self, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(max(timeout_s / 4, 0.25))
            try:
                await self.sweep_sites(timeout_s)
            except Exception:  # a store hiccup must not end the sweeper
                log.exception("site_sweep_failed")

    def _site_seen(self, site: str, state: str, at: float) -> None:
        """Keep the site gauges in step with the store's row just written."""
        self._metrics.site_up.labels(site).set(1 if state == "online" else 0)
        self._metrics.site_last_seen.labels(site).set(at)
        if self._site_states.get(site) != state:
            self._site_states[site] = state
            self._metrics.sites_online.set(sum(1 for s in self._site_states.values() if s == "online"))

    # ---------------------------------------------------------------- uploads
    async def receive_update(self, site: str, env: UpdateEnvelope, body: bytes) -> dict[str, Any]:
        """Validate, store durably, then fold in; returns the acknowledgement. Raises `Rejection`."""
        runner = await self._runner_for(site, env.job_id, env.round)
        async with runner.lock:
            # A retry (same bytes) is acknowledged again even after its round closed: the first ack may be lost.
            existing = await self._db(self._store.get_update, env.job_id, env.round, site)
            if existing is not None:
                if existing.sha256 == env.sha256:
                    return {"status": "duplicate", "job_id": env.job_id, "round": env.round}
                raise Rejection("duplicate_conflict", "a different update was already accepted for this round", 409)
            job = await self._current(runner, env.round, "train")
            update = await asyncio.to_thread(check_update, body, env.sha256, runner.global_weights, runner.spec, env)
            await self._db(self._blobs.put, body)
            failpoint("ingest_after_blob")
            spend = spend_by_unit(runner.spec, env)
            row = UpdateRow(
                env.job_id, env.round, site, env.sha256, env.num_samples, env.train_loss, env.epsilon, time.time(),
                env.share_tracking, tuple(spend.items()),
            )
            await self._db(self._store.add_update, row, env.evaluation)
            failpoint("ingest_after_commit")
            runner.strategy.add(update, env.num_samples)
            self._metrics.updates_received.labels(site).inc()
            self._metrics.observe_spend(env.job_id, site, spend)
            log.info("update_accepted", round=env.round, num_samples=env.num_samples, epsilon=spend)
            await self._maybe_close(runner, job.round)
        return {"status": "accepted", "job_id": env.job_id, "round": env.round}

    async def receive_evaluation(self, site: str, report: EvaluationReport) -> dict[str, Any]:
        runner = await self._runner_for(site, report.job_id, report.round)
        async with runner.lock:
            job = await self._current(runner, report.round, "evaluate")
            # A site whose policy lets no metric leave still reports, with nothing in it.
            evaluation = report.evaluation or EvalMetrics(n=0)
            added = await self._db(self._store.add_evaluation, report.job_id, report.round - 1, site, evaluation)
            if added:
                log.info("evaluation_accepted", round=report.round, n=evaluation.n)
                await self._maybe_close(runner, job.round)
        return {"status": "accepted" if added else "duplicate", "job_id": report.job_id, "round": report.round}

    async def _runner_for(self, site: str, job_id: str, rnd: int) -> JobRunner:
        runner = self._runners.get(job_id)
        if runner is None:
            job = await self._db(self._store.get_job, job_id)
            if job is None:
                raise Rejection("unknown_job", f"no job {job_id!r}", 404)
            raise Rejection("job_not_running", f"job {job_id} is {job.state}", 409)
        if site not in runner.active_sites:
            raise Rejection("site_not_in_job", f"site {site!r} has not accepted job {job_id}", 403)
        return runner

    async def _current(self, runner: JobRunner, rnd: int, kind: str) -> JobRow:
        job = await self._db(self._store.get_job, runner.job_id)
        assert job is not None
        if job.state != "running":
            raise Rejection("job_not_running", f"job {runner.job_id} is {job.state}", 409)
        if rnd < job.round:
            raise Rejection("late_update", f"round {rnd} is closed; the job is in round {job.round}", 409)
        if rnd > job.round:
            raise Rejection("round_not_open", f"round {rnd} has not started; current round {job.round}", 409)
        r = await self._db(self._store.get_round, runner.job_id, rnd)
        if r is None or r.state != "open" or r.kind != kind:
            raise Rejection("round_not_open", f"round {rnd} is not an open {kind} round", 409)
        return job

    # ---------------------------------------------------------------- round transitions
    async def _maybe_start(self, runner: JobRunner) -> None:
        decisions = await self._db(self._store.decisions, runner.job_id)
        if all(d.decision != "offered" for d in decisions):
            await self._start_or_fail(runner, decisions)

    async def _accept_deadline(self, runner: JobRunner) -> None:
        job = await self._db(self._store.get_job, runner.job_id)
        if job is not None and job.state == "offered":
            await self._start_or_fail(runner, await self._db(self._store.decisions, runner.job_id))

    async def _start_or_fail(self, runner: JobRunner, decisions: list[SiteDecision]) -> None:
        accepted = [d.site for d in decisions if d.decision == "accepted"]
        if len(accepted) >= runner.spec.min_sites:
            await self._open(runner, 1, "train")
            return
        refused = "; ".join(
            f"{d.site}: {', '.join(d.reasons) or d.decision}" for d in decisions if d.site not in accepted
        )
        await self._end(
            runner, "failed",
            f"only {len(accepted)} of {len(decisions)} sites accepted (min_sites {runner.spec.min_sites}); {refused}",
        )

    async def _open(self, runner: JobRunner, rnd: int, kind: str) -> None:
        job = await self._db(self._store.get_job, runner.job_id)
        assert job is not None
        now = time.time()
        deadline = now + runner.spec.round_deadline_s
        await self._db(self._store.open_round, runner.job_id, rnd, kind, job.model_sha, now, deadline)
        runner.strategy.reset(runner.global_weights)
        runner.round_started = now
        self._announce(runner, kind, rnd, deadline, job.model_sha)
        self._arm(runner, runner.spec.round_deadline_s, self._round_deadline)
        log.info("round_opened", job=runner.job_id, round=rnd, kind=kind, sites=sorted(runner.active_sites))

    def _announce(self, runner: JobRunner, kind: str, rnd: int, deadline: float, sha: str) -> None:
        task = self._sign(
            RoundTask(
                kind=kind,  # type: ignore[arg-type]
                job_id=runner.job_id, round=rnd, model_sha256=sha, deadline=deadline, issued_at=time.time(),
                expires_at=deadline, nonce=nonce(),
            )
        )
        for site in sorted(runner.active_sites):
            self._pub.publish(topics.tasks(site, runner.job_id), task, retain=True)

    async def _maybe_close(self, runner: JobRunner, rnd: int) -> None:
        r = await self._db(self._store.get_round, runner.job_id, rnd)
        if r is None or r.state != "open":
            return
        reported = await self._reported(runner, rnd, r.kind)
        if runner.active_sites and len(reported & runner.active_sites) >= quorum_size(runner):
            await self._close(runner, rnd, r.kind, reported)
        elif len(runner.active_sites) < runner.spec.min_sites and r.kind == "train":
            await self._end(
                runner, "failed",
                f"round {rnd}: only {len(runner.active_sites)} sites still take part (min_sites "
                f"{runner.spec.min_sites})",
            )

    async def _reported(self, runner: JobRunner, rnd: int, kind: str) -> set[str]:
        if kind == "train":
            return {u.site for u in await self._db(self._store.updates, runner.job_id, rnd)}
        evals = await self._db(self._store.evaluations, runner.job_id)
        return set(evals.get(rnd - 1, {}))

    async def _round_deadline(self, runner: JobRunner) -> None:
        job = await self._db(self._store.get_job, runner.job_id)
        if job is None or job.state != "running":
            return
        r = await self._db(self._store.get_round, runner.job_id, job.round)
        if r is None or r.state != "open":
            return
        reported = await self._reported(runner, job.round, r.kind)
        missing = sorted(runner.active_sites - reported)
        log.warning("round_deadline", job=runner.job_id, round=job.round, reported=len(reported), missing=missing)
        if r.kind == "evaluate" or len(reported) >= runner.spec.min_sites:
            await self._close(runner, job.round, r.kind, reported)
        else:
            await self._end(
                runner, "failed",
                f"round {job.round} reached its deadline with {len(reported)} of min_sites "
                f"{runner.spec.min_sites} updates; missing: {', '.join(missing)}",
            )

    async def _close(self, runner: JobRunner, rnd: int, kind: str, reported: set[str]) -> None:
        with structlog.contextvars.bound_contextvars(job=runner.job_id, round=rnd):
            if runner.timer is not None and runner.timer is not asyncio.current_task():
                runner.timer.cancel()
            model_out: str | None = None
            n_samples, loss = 0, None
            if kind == "train":
                ups = await self._db(self._store.updates, runner.job_id, rnd)
                n_samples = sum(u.num_samples for u in ups)
                loss = sum(u.train_loss * u.num_samples for u in ups) / max(n_samples, 1)
                new_weights = await asyncio.to_thread(runner.strategy.apply, runner.global_weights)
                model_out = await self._db(self._blobs.put, encode(new_weights))
                failpoint("finalize_after_blob")
            await self._db(
                self._store.close_round, runner.job_id, rnd, model_out, len(reported), n_samples, loss, time.time()
            )
            failpoint("finalize_after_commit")
            duration = time.time() - runner.round_started
            self._metrics.round_duration.labels(kind).observe(duration)
            if kind == "train":
                runner.global_weights = new_weights
                self._metrics.rounds_completed.labels(runner.job_id).inc()
            await self._update_global_gauges(runner)
            log.info("round_closed", kind=kind, sites=len(reported), samples=n_samples, duration_s=round(duration, 3))
            if self._on_job_event is not None and kind == "train":
                await self._on_job_event(runner.job_id, "round_closed")
            await self._after_close(runner, rnd, kind)

    async def _after_close(self, runner: JobRunner, rnd: int, kind: str) -> None:
        job = await self._db(self._store.get_job, runner.job_id)
        if job is not None and job.paused and kind == "train":
            log.info("job_paused_after_round", job=runner.job_id, round=rnd)
            return
        if kind == "evaluate":
            await self._end(runner, "finished", "")
        elif rnd < runner.spec.rounds:
            await self._open(runner, rnd + 1, "train")
        else:
            await self._open(runner, rnd + 1, "evaluate")

    async def _end(self, runner: JobRunner, state: str, reason: str) -> None:
        job = await self._db(self._store.get_job, runner.job_id)
        if job is None or job.state not in ACTIVE:
            return
        if runner.timer is not None and runner.timer is not asyncio.current_task():
            runner.timer.cancel()
        await self._db(self._store.set_job_state, runner.job_id, state, reason, time.time())
        now = time.time()
        closed = self._sign(
            RoundTask(kind="closed", job_id=runner.job_id, round=job.round, state=state, reason=reason or None,
                      issued_at=now, expires_at=now + CLOSED_TTL_S, nonce=nonce())
        )
        for site in runner.spec.sites:
            self._pub.publish(topics.tasks(site, runner.job_id), closed, retain=True)
            self._pub.publish(topics.offers(site, runner.job_id), b"", retain=True)  # clears the retained offer
        self._runners.pop(runner.job_id, None)
        (log.info if state == "finished" else log.warning)("job_ended", job=runner.job_id, state=state, reason=reason)
        await self._refresh_job_gauge()
        if self._on_job_event is not None:
            await self._on_job_event(runner.job_id, state)

    # ---------------------------------------------------------------- helpers
    def _arm(self, runner: JobRunner, delay: float, fn: Callable[[JobRunner], Awaitable[None]]) -> None:
        if runner.timer is not None:
            runner.timer.cancel()

        async def fire() -> None:
            await asyncio.sleep(delay)
            async with runner.lock:
                runner.timer = None
                await fn(runner)

        runner.timer = asyncio.create_task(fire())

    async def _update_global_gauges(self, runner: JobRunner) -> None:
        evals = await self._db(self._store.evaluations, runner.job_id)
        if not evals:
            return
        g = weighted(evals[max(evals)])
        if g.auc is not None:
            self._metrics.global_auc.labels(runner.job_id).set(g.auc)
        if g.loss is not None:
            self._metrics.global_loss.labels(runner.job_id).set(g.loss)

    async def _refresh_job_gauge(self) -> None:
        jobs = await self._db(self._store.list_jobs, None)
        for state in ("offered", "running", "finished", "failed", "cancelled"):
            self._metrics.jobs.labels(state).set(sum(1 for j in jobs if j.state == state))


def quorum_size(runner: JobRunner) -> int:
    """How many participating sites must report before a round closes early (ceil of the job's fraction)."""
    spec = runner.spec
    return min(len(runner.active_sites), max(spec.min_sites, math.ceil(spec.quorum * len(runner.active_sites))))


def weighted(per_site: dict[str, EvalMetrics]) -> EvalMetrics:
    """Sample-weighted mean of per-site validation metrics; a site without a metric is left out of its mean."""

    def mean(values: list[tuple[float | None, int]]) -> float | None:
        pairs = [(v, n) for v, n in values if v is not None]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    ms = list(per_site.values())
    return EvalMetrics(
        n=sum(m.n for m in ms), loss=mean([(m.loss, m.n) for m in ms]), auc=mean([(m.auc, m.n) for m in ms])
    )
