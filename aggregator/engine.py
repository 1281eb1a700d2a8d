"""The round engine: drives each job through offer → rounds → final evaluation, one writer per job.

Every state change is written to the store before anything is announced, so a restarted aggregator
(`recover`) continues from the store alone: acknowledged updates are never lost, finished rounds never redone.
Each job's current round, the sites that reported in it and each site's decision are also kept in memory
(`aggregator.runner.JobRunner`), so an upload costs the same few store calls whatever the number of sites.
What follows a round or a job (tracking, reports) is posted to `aggregator.jobevents` and never awaited here.
This module is what calls into a job (submission, recovery, operator actions, site answers, uploads); the
transitions between its rounds are in `aggregator.rounds`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from aggregator.jobevents import JobEnded, JobResumed
from aggregator.privacy_units import spend_by_unit
from aggregator.rounds import nonce
from aggregator.runner import ACTIVE, JobRunner, initial_weights, new_job_id
from aggregator.secagg import check_masked
from aggregator.secure_rounds import SecureSteps
from aggregator.store import JobRow, SiteDecision, UpdateRow
from aggregator.store.leases import Fence, FencedOut
from aggregator.store.quarantine import Quarantined
from aggregator.strategies import make_strategy
from aggregator.validation import Rejection, check_update
from federation import topics
from federation.faults import failpoint
from federation.jobs import JobSpec
from federation.messages import EvalMetrics, EvaluationReport, JobOffer, SiteEvent, UpdateEnvelope
from federation.secagg.job import model_dim
from federation.tensors import decode, encode, frame_limit

log = structlog.get_logger(__name__)
LATE_REPORT_S = 300.0  # how long after a job ends a site's report of a missing round is still kept
LATE_REPORT_ROWS = 1000  # and not once the ended job has this many rejections on record


class RoundEngine(SecureSteps):
    # ---------------------------------------------------------------- lifecycle
    async def submit(self, spec: JobSpec, requester: str) -> str:
        job_id = new_job_id(spec.name)
        weights = initial_weights(spec)
        sha = await self._db(self._blobs.put, encode(weights), "model")
        now = time.time()
        lease = (self._lease.holder, self._lease.address, self._lease.ttl_s) if self._lease is not None else None
        token = await self._db(self._store.create_job, job_id, spec, sha, now, requester, lease)
        runner = JobRunner(job_id, spec, weights, sha, make_strategy(spec),
                           decisions=dict.fromkeys(spec.sites, "offered"),
                           fence=None if self._lease is None or token is None else Fence(job_id, self._lease.holder,
                                                                                         token))
        self._runners[job_id] = runner
        self._offer(runner, requester, now, spec.sites)
        self._arm(runner, spec.accept_deadline_s, self._accept_deadline)
        log.info("job_submitted", job=job_id, sites=spec.sites, rounds=spec.rounds, requester=requester)
        await self._refresh_job_gauge()
        return job_id

    def offer_bytes(self, spec: JobSpec, requester: str) -> int:
        """The size of the signed offer `spec` would be published as."""
        now = time.time()
        probe = JobOffer(job_id=new_job_id(spec.name), spec=spec, requester=requester, issued_at=now,
                         expires_at=now + spec.accept_deadline_s, nonce=nonce())
        return len(self._sign(probe))

    def _offer(self, runner: JobRunner, requester: str, created_at: float, sites: list[str]) -> None:
        """Publish the signed offer (retained) to each site; it expires at the job's accept deadline."""
        spec = runner.spec
        offer = self._sign(JobOffer(job_id=runner.job_id, spec=spec, requester=requester, issued_at=time.time(),
                                    expires_at=created_at + spec.accept_deadline_s, nonce=nonce()))
        for site in sites:
            self._pub.publish(topics.offers(site, runner.job_id), offer, retain=True)

    async def recover(self) -> None:
        """After a (re)start without leases (a single writer): quarantine bad site rows, then resume every
        unfinished job from the store. With leases, `aggregator.leases.LeaseKeeper` calls `take` job by job."""
        self._quarantined(await self._db(self._store.quarantine_sites, time.time()))
        if self._lease is None:
            for job_id in [j.job_id for j in await self._db(self._store.list_jobs, ACTIVE)]:
                await self.take(job_id, None)
        await self._refresh_job_gauge()

    async def take(self, job_id: str, fence: Fence | None) -> None:
        """Become the writer of `job_id` and resume it from the store. Its stored rows that fail their checks are
        quarantined first, failing the job; a job that still cannot be resumed fails with the reason. Nothing
        stored stops the aggregator."""
        moved = await self._db(self._store.quarantine_job, job_id, time.time(), fence)
        self._quarantined(moved)
        if moved:
            if any(q.table != "jobs" for q in moved):
                self._post(JobEnded(job_id, "failed"))  # its report, from the rows left
            return
        job = await self._db(self._store.get_job, job_id)
        if job is None or job.state not in ACTIVE:
            return
        try:
            await self._recover_job(job, fence)
        except FencedOut as exc:
            self.lose(job_id, str(exc))
        except Exception as exc:
            log.exception("job_not_recovered", job=job_id)
            reason = f"could not be resumed after a restart: {type(exc).__name__}: {exc}"[:1000]
            runner = self._runners.get(job_id)
            if runner is not None:  # tell its sites, as any ending does
                async with runner.lock:
                    await self._end(runner, "failed", reason)
            else:
                await self._db(self._store.set_job_state, job_id, "failed", reason, time.time(), fence=fence)
                self._post(JobEnded(job_id, "failed"))

    def _quarantined(self, moved: list[Quarantined]) -> None:
        for q in moved:
            self._metrics.quarantined_rows.labels(q.table).inc()
            log.warning("stored_row_quarantined", table=q.table, job=q.job_id, key=q.key, reason=q.reason)

    def fences(self) -> list[Fence]:
        return [r.fence for r in self._runners.values() if r.fence is not None]

    def runs(self, job_id: str) -> bool:
        """Whether this replica is the writer of the active job `job_id`."""
        return job_id in self._runners

    async def _recover_job(self, job: JobRow, fence: Fence | None) -> None:
        weights = decode(await self._db(self._blobs.get, job.model_sha))
        runner = JobRunner(job.job_id, job.spec, weights, job.model_sha, make_strategy(job.spec),
                           state=job.state, paused=job.paused, fence=fence)
        for d in await self._db(self._store.decisions, job.job_id):
            runner.decide(d.site, d.decision)
        if job.spec.secure_aggregation is not None:
            await self._load_share_keys(runner)
        self._runners[job.job_id] = runner
        async with runner.lock:
            if job.state == "offered":
                # A crash between the commit and the broker's acknowledgement may have lost the offers:
                # publish them again to the sites that have not answered (agents answer a repeat the same).
                unanswered = [s for s in job.spec.sites if runner.decisions.get(s) == "offered"]
                self._offer(runner, job.requester, job.created_at, unanswered)
                remaining = job.created_at + job.spec.accept_deadline_s - time.time()
                self._arm(runner, max(remaining, 0.0), self._accept_deadline)
                await self._maybe_start(runner)
            else:
                await self._resume_round(runner, job)
        self._post(JobResumed(job.job_id))
        log.info("job_recovered", job=job.job_id, state=job.state, round=job.round)

    async def _resume_round(self, runner: JobRunner, job: JobRow) -> None:
        rnd = await self._db(self._store.get_round, job.job_id, job.round)
        if rnd is None:
            return
        runner.round = rnd
        if rnd.state == "closed":  # crashed after closing, before opening the next one
            await self._after_close(runner, rnd)
            return
        runner.strategy.reset(runner.global_weights)
        if rnd.kind == "train" and runner.spec.secure_aggregation is not None:
            await self._secure_recover(runner, rnd.round)
        elif rnd.kind == "train":
            for u in await self._db(self._store.updates, job.job_id, job.round):
                runner.strategy.add(decode(await self._db(self._blobs.get, u.sha256)), u.num_samples)
                runner.reported.add(u.site)
        else:
            runner.reported = set((await self._db(self._store.evaluations, job.job_id, rnd.round - 1)).get(
                rnd.round - 1, {}))
        self._announce(runner, rnd)
        unmask = runner.secure.unmask if runner.secure is not None and rnd.kind == "train" else None
        if unmask is not None:
            self._arm(runner, max(unmask.deadline - time.time(), 0.0), self._unmask_deadline)
        else:
            self._arm(runner, max(rnd.deadline - time.time(), 0.0), self._round_deadline)
        await self._maybe_close(runner)

    def update_limit(self, job_id: str) -> int | None:
        """The largest update body the active job `job_id` can have (None: no such active job)."""
        runner = self._runners.get(job_id)
        if runner is None:
            return None
        if runner.spec.secure_aggregation is not None:
            return self._secure_update_limit(runner)
        return frame_limit(runner.global_weights)

    def invited(self, job_id: str, site: str) -> bool:
        """Whether `site` was offered the active job `job_id` (what it sends about it is worth a stored row)."""
        runner = self._runners.get(job_id)
        return runner is not None and site in runner.decisions

    def _running(self, job_id: str) -> JobRunner:
        """The runner of an active job; KeyError (which the API answers with 409) when there is none."""
        runner = self._runners.get(job_id)
        if runner is None:
            raise KeyError(job_id)
        return runner

    async def cancel(self, job_id: str, reason: str = "cancelled by operator") -> None:
        runner = self._running(job_id)
        async with runner.lock:
            if runner.ended:
                raise KeyError(job_id)
            await self._end(runner, "cancelled", reason)

    async def pause(self, job_id: str) -> None:
        """Let the current round finish, then start no new one until `resume`."""
        await self._set_paused(job_id, True)

    async def resume(self, job_id: str) -> None:
        runner = await self._set_paused(job_id, False)
        async with runner.lock:
            if not runner.ended and runner.round is not None and runner.round.state == "closed":
                await self._after_close(runner, runner.round)

    async def _set_paused(self, job_id: str, paused: bool) -> JobRunner:
        runner = self._running(job_id)
        async with runner.lock:
            if runner.ended:
                raise KeyError(job_id)
            await self._db(self._store.set_paused, job_id, paused, time.time(), fence=runner.fence)
            runner.paused = paused
            log.info("job_paused" if paused else "job_resumed", job=job_id)
        return runner

    async def shutdown(self) -> None:
        """Stop writing, and hand each job's lease over: on a rolling update the other replicas take the jobs at
        their next look (a quarter of the TTL) rather than after the lease's TTL."""
        for r in self._runners.values():
            for timer in (r.timer, r.secure_timer):
                if timer is not None:
                    timer.cancel()
        for job_id, r in list(self._runners.items()):
            async with r.lock:  # a write in flight finishes first
                self.lose(job_id, "this replica is shutting down")
            if r.fence is not None:
                try:
                    await self._db(self._store.hand_over_lease, r.fence)
                except Exception:  # the lease then simply expires after its TTL
                    log.warning("lease_hand_over_failed", job=job_id, exc_info=True)

    # ---------------------------------------------------------------- site messages
    async def on_site_event(self, event: SiteEvent) -> None:
        try:
            await self._on_site_event(event)
        except FencedOut as exc:
            self.lose(exc.job_id, str(exc))

    async def _on_site_event(self, event: SiteEvent) -> None:
        runner = self._runners.get(event.job_id)
        with structlog.contextvars.bound_contextvars(job=event.job_id, site=event.site):
            if runner is None and event.kind == "error" and await self._late_site_error(event):
                return
            if runner is None or event.site not in runner.decisions:
                log.info("site_event_ignored", kind=event.kind, reason="unknown job or site not in job")
                return
            if event.kind == "error":  # the site stays in the job; the operator sees why a round went missing
                log.warning("site_error", round=event.round, reasons=event.reasons)
                await self._db(self._store.add_rejection, event.job_id, event.round, event.site, "site_error",
                               "; ".join(event.reasons), event.at)
                return
            async with runner.lock:
                if runner.ended:
                    return
                decision = {"accepted": "accepted", "refused": "refused"}.get(event.kind, "stopped")
                if decision == "accepted" and runner.decisions[event.site] != "offered":
                    return  # a repeated answer (e.g. after an agent restart) changes nothing
                reasons = event.reasons
                if decision == "accepted" and runner.spec.secure_aggregation is not None:
                    missing = await self._secure_key(runner, event)
                    decision, reasons = ("refused", missing) if missing else (decision, reasons)
                await self._db(
                    self._store.record_decision, event.job_id,
                    SiteDecision(event.site, decision, reasons, event.epsilon_planned, event.at),
                    fence=runner.fence,
                )
                runner.decide(event.site, decision)
                log.info("site_decision", decision=decision, reasons=reasons)
                if decision == "refused":
                    self._metrics.site_refusals.labels(event.site).inc()
                if runner.state == "offered":
                    await self._maybe_start(runner)
                else:
                    await self._maybe_close(runner)

    async def _late_site_error(self, event: SiteEvent) -> bool:
        """Keep a site's report of a round it could not release that arrives once its job has ended: it says why
        the round went missing, and a round stopped at its deadline is reported just as the job fails at that same
        deadline. Only for a job that ended at most `LATE_REPORT_S` before, from a site it invited, up to
        `LATE_REPORT_ROWS` rows; every replica hears the report, so an identical row already stored is not stored
        again."""
        job = await self._db(self._store.get_job, event.job_id)
        if job is None or job.state in ACTIVE or event.at - job.updated_at > LATE_REPORT_S \
                or not await self._db(self._store.invited, event.job_id, event.site):
            return False
        detail = "; ".join(event.reasons)
        stored = await self._db(self._store.rejections, event.job_id, LATE_REPORT_ROWS)
        if len(stored) < LATE_REPORT_ROWS and not any(
                (r["round"], r["site"], r["reason"], r["detail"]) == (event.round, event.site, "site_error", detail)
                for r in stored):
            log.warning("site_error", round=event.round, reasons=event.reasons, job_state=job.state)
            await self._db(self._store.add_rejection, event.job_id, event.round, event.site, "site_error", detail,
                           event.at)
        return True

    # ---------------------------------------------------------------- uploads
    async def receive_update(self, site: str, env: UpdateEnvelope, body: bytes) -> dict[str, Any]:
        """Validate, store durably, then fold in; returns the acknowledgement. Raises `Rejection`.

        Validation and the blob write (content-addressed, so idempotent) run outside the job's lock, several
        uploads side by side; only the duplicate check, the commit and the fold hold it."""
        runner = await self._runner_for(site, env.job_id)
        if runner.round is not None and env.round < runner.round.round:
            # A closed round: the retry of an acknowledged update is acknowledged again (the first acknowledgement
            # may have been lost); anything else is late.
            existing = await self._db(self._store.get_update, env.job_id, env.round, site)
            if existing is not None:
                return self._duplicate(existing, env)
        self._current(runner, env.round, "train")
        secure = runner.spec.secure_aggregation is not None
        if secure:
            self._check_masked_upload(runner, site, env.round, env.num_samples)
        async with self._ingest:
            if secure:
                update = {"masked": await asyncio.to_thread(check_masked, body, env.sha256,
                                                            model_dim(runner.global_weights))}
            else:
                update = await asyncio.to_thread(check_update, body, env.sha256, runner.global_weights, runner.spec,
                                                 env)
            await self._db.io(self._blobs.put, body, "update")
        failpoint("ingest_after_blob")
        spend = spend_by_unit(runner.spec, env)
        async with runner.lock:
            existing = await self._db(self._store.get_update, env.job_id, env.round, site)
            if existing is not None:
                return self._duplicate(existing, env)
            self._current(runner, env.round, "train")
            sr = self._check_masked_upload(runner, site, env.round, env.num_samples) if secure else None
            row = UpdateRow(
                env.job_id, env.round, site, env.sha256, env.num_samples, env.train_loss, env.epsilon, time.time(),
                env.share_tracking, tuple(spend.items()),
            )
            failpoint("ingest_before_commit")
            await self._db(self._store.add_update, row, env.evaluation, fence=runner.fence)
            failpoint("ingest_after_commit")
            if sr is not None:
                sr.add_masked(site, update["masked"])
            else:
                runner.strategy.add(update, env.num_samples)
            runner.reported.add(site)
            self._metrics.updates_received.labels(site).inc()
            self._metrics.observe_spend(env.job_id, site, spend)
            log.info("update_accepted", round=env.round, num_samples=env.num_samples, epsilon=spend)
            await self._maybe_close(runner)
        return {"status": "accepted", "job_id": env.job_id, "round": env.round}

    @staticmethod
    def _duplicate(existing: UpdateRow, env: UpdateEnvelope) -> dict[str, Any]:
        if existing.sha256 == env.sha256:
            return {"status": "duplicate", "job_id": env.job_id, "round": env.round}
        raise Rejection("duplicate_conflict", "a different update was already accepted for this round", 409)

    async def receive_evaluation(self, site: str, report: EvaluationReport) -> dict[str, Any]:
        runner = await self._runner_for(site, report.job_id)
        async with runner.lock:
            self._current(runner, report.round, "evaluate")
            # A site whose policy lets no metric leave still reports, with nothing in it.
            evaluation = report.evaluation or EvalMetrics(n=0)
            added = await self._db(self._store.add_evaluation, report.job_id, report.round - 1, site, evaluation,
                                   fence=runner.fence)
            if added:
                runner.reported.add(site)
                log.info("evaluation_accepted", round=report.round, n=evaluation.n)
                await self._maybe_close(runner)
        return {"status": "accepted" if added else "duplicate", "job_id": report.job_id, "round": report.round}
