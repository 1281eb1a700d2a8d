"""A secure-aggregation round at this site (`federation.secagg.messages` has the protocol; `agent.secagg` the
state): share before training, mask against the frozen roster, then reveal in the background.

`Rounds` trains and releases as for any round; this module adds the steps around it. Posting the shares and reading
the roster are bounded by the round's deadline; the unmask phase runs as a background task (the message worker is not
held while other sites finish) bounded by the unmask request's deadline, and is cancelled with the job or the daemon.
It needs only the job's share key and the inbox the aggregator serves, so an agent that restarts after uploading
still reveals for that round.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, TypeVar

import numpy as np
import structlog

from agent.egress import EgressRefusedError, UploadRejectedError, retrying
from agent.privacy import RoundLateError
from agent.secagg import ExcludedError, SecAggRefusedError, SecureRound, reveal
from agent.site import ActiveJob, Site
from agent.verifier import MessageRefusedError, Verifier
from federation.messages import RoundTask
from federation.secagg.job import weights
from federation.secagg.messages import MAX_WAIT_S, MaskRoster, UnmaskWork

log = structlog.get_logger(__name__)
# How long after the round's deadline a site keeps asking for unmask work: the aggregator issues the request once the
# round's uploads are in, at the latest at the deadline; this covers an aggregator restart or failover in between.
UNMASK_AFTER_DEADLINE_S = 300.0
MIN_POLL_S = 1.0  # a 202 that comes back sooner than this is waited out, so an impatient server is not hammered
MAX_KEPT_ROSTERS = 64  # rosters masked against, kept for the unmask phase (which fetches one it does not hold)
T = TypeVar("T")


class Shared(NamedTuple):
    """A round's secrets once their shares are posted, and the signed roster if the answer brought it."""

    secure: SecureRound
    roster: bytes | None


class SecureRounds:
    def __init__(self, site: Site, verifier: Verifier) -> None:
        self._s = site
        self._verifier = verifier
        self._unmasking: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._rosters: dict[tuple[str, int], MaskRoster] = {}  # checked and masked against, awaiting the unmask

    # ---------------------------------------------------------------- before and after training
    async def share(self, task: RoundTask, job: ActiveJob) -> Shared:
        """Make the round's mask secrets and post their shares, retrying until the deadline; the answer waits for
        the round's roster and usually carries it, for `masker`. A site that already posted shares for this round
        (before a restart) lost those secrets: it is a dropout (`ExcludedError`)."""
        s = self._s
        if s.state.shared(task.job_id, task.round) is not None:
            raise ExcludedError(f"this site posted its shares for round {task.round} and restarted before uploading: "
                                "its round secrets are gone, so it is a dropout of this round; nothing was released "
                                "or charged")
        if task.share_keys is None:
            raise SecAggRefusedError("the task of a secure-aggregation job carries no share keys")
        secure = SecureRound(s.name, task.job_id, task.round, job.spec.secagg_threshold,
                             s.share_keys.private(task.job_id), task.share_keys, job.spec.sites,
                             num_samples=job.data.n_train)
        bundle = secure.bundle()
        s.state.record_shared(task.job_id, task.round, secure.mask_key)
        # The answer waits for the roster (frozen once every participant shared): training goes on meanwhile.
        wait = MAX_WAIT_S if task.deadline is None else min(MAX_WAIT_S, max(task.deadline - time.time(), 0.0))
        try:
            ack = await retrying(lambda: s.gate.send_shares(bundle, wait), task.deadline)
        except UploadRejectedError as exc:
            if exc.code == "roster_frozen":
                raise ExcludedError(f"round {task.round}'s roster was frozen before this site's shares arrived: "
                                    "nothing was trained, released or charged") from None
            raise
        answer = _json_object(ack)
        roster = answer.get("roster")
        log.info("secagg_shares_sent", participants=len(bundle.shares), status=str(answer.get("status"))[:40],
                 roster=isinstance(roster, str))
        return Shared(secure, roster.encode() if isinstance(roster, str) else None)

    async def masker(self, task: RoundTask, job: ActiveJob, shared: Shared
                     ) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
        """The round's roster (long-polled until the deadline), checked; the mask bound to it for the privacy
        engine, and this site's weight in the sum (`federation.secagg.job.weights`). No roster in time:
        `RoundLateError`; not in it: `ExcludedError`; neither is released or charged."""
        secure = shared.secure
        roster = (self._verified_roster(shared.roster, task.job_id, task.round) if shared.roster is not None
                  else await self._roster(task.job_id, task.round, task.deadline))
        if roster is None:
            raise RoundLateError(f"round {task.round}'s roster was not frozen before its deadline: its update was not "
                                 "released and no ε was charged")
        secure.check_roster(roster)
        self._rosters[(task.job_id, task.round)] = roster
        while len(self._rosters) > MAX_KEPT_ROSTERS:
            self._rosters.pop(next(iter(self._rosters)))
        weight = weights(job.spec, roster.num_samples)[self._s.name]
        log.info("secagg_roster", sites=len(roster.mask_keys), weight=round(weight, 4))
        return (lambda values: secure.mask(values, roster)), weight

    async def _roster(self, job_id: str, rnd: int, deadline: float | None) -> MaskRoster | None:
        body = await _poll(functools.partial(self._s.gate.fetch_roster, job_id, rnd), deadline)
        return None if body is None else self._verified_roster(body, job_id, rnd)

    def _verified_roster(self, body: bytes, job_id: str, rnd: int) -> MaskRoster:
        try:
            return self._verifier.roster(body, job_id, rnd)
        except MessageRefusedError as exc:  # not signed by the aggregator, or another round's: never masked against
            raise SecAggRefusedError(exc.reason) from None

    # ---------------------------------------------------------------- unmask
    def start_unmask(self, task: RoundTask) -> None:
        """Run the round's unmask phase in the background (once at a time per round; a repeated task is a no-op
        while it runs, and runs it again after: revealing the same split again is idempotent)."""
        key = (task.job_id, task.round)
        if key in self._unmasking:
            return
        job = asyncio.create_task(self.unmask(task))
        self._unmasking[key] = job
        job.add_done_callback(lambda _: self._unmasking.pop(key, None))

    def cancel_job(self, job_id: str) -> None:
        for (job, _), t in list(self._unmasking.items()):
            if job == job_id:
                t.cancel()
        for key in [k for k in self._rosters if k[0] == job_id]:
            del self._rosters[key]

    async def stop(self) -> None:
        tasks = list(self._unmasking.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def join(self) -> None:
        """Wait for the unmask phases in flight to end."""
        await asyncio.gather(*self._unmasking.values(), return_exceptions=True)

    async def unmask(self, task: RoundTask) -> None:
        """The round's unmask phase: the roster, this site's unmask work, the checked reveal, recorded, then sent."""
        with structlog.contextvars.bound_contextvars(job=task.job_id, round=task.round):
            try:
                await self._unmask_round(task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the daemon outlives any one round's unmask phase
                log.exception("secagg_unmask_failed", reason=str(exc)[:300])

    async def _unmask_round(self, task: RoundTask) -> None:
        s, job_id, rnd = self._s, task.job_id, task.round
        horizon = (task.deadline if task.deadline is not None else time.time()) + UNMASK_AFTER_DEADLINE_S
        try:
            # The roster this site masked against, or (after a restart) the one the aggregator froze.
            roster = self._rosters.pop((job_id, rnd), None) or await self._roster(job_id, rnd, horizon)
            work = await self._work(job_id, rnd, horizon) if roster is not None else None
            if roster is None or work is None:
                log.warning("secagg_no_unmask_work", roster=roster is not None)
                return
            request = self._verifier.unmask_request(work.request, job_id, rnd)
            outcome = reveal(s.name, s.share_keys.private(job_id), task.share_keys or {}, work, request, roster,
                             s.state.reveal_of(job_id, rnd))
        except (MessageRefusedError, SecAggRefusedError) as exc:
            reason = str(exc)
            s.metrics.secagg_refusals.labels("reveal").inc()
            log.warning("secagg_reveal_refused", reason=reason)
            s.log_audit("secagg_reveal_refused", job_id=job_id, round=rnd, reason=reason)
            s.event(job_id, "error", [f"round {rnd}: refused to reveal shares: {reason}"], round=rnd)
            return
        if outcome.unopened:
            s.metrics.secagg_refusals.labels("share").inc(len(outcome.unopened))
            log.warning("secagg_shares_refused", senders=sorted(outcome.unopened))
            s.log_audit("secagg_share_refused", job_id=job_id, round=rnd, senders=outcome.unopened)
        s.state.record_reveal(job_id, rnd, request.survivors, request.dropped)  # before it leaves: never two splits
        try:
            ack = await retrying(lambda: s.gate.send_reveal(outcome.reveal), request.deadline)
        except (UploadRejectedError, EgressRefusedError) as exc:
            if isinstance(exc, UploadRejectedError) and exc.code == "late_update":  # unmasked with others' reveals
                log.info("secagg_reveal_not_needed", reason=exc.detail[:300])
            else:
                log.warning("secagg_reveal_not_sent", reason=str(exc)[:300])
            return
        s.metrics.secagg_reveals_sent.inc()
        log.info("secagg_reveal_sent", self_mask_shares=len(outcome.reveal.self_mask_shares),
                 mask_key_shares=len(outcome.reveal.mask_key_shares), ack=ack.decode(errors="replace")[:100])

    async def _work(self, job_id: str, rnd: int, horizon: float) -> UnmaskWork | None:
        try:
            return await _poll(functools.partial(self._s.gate.fetch_unmask, job_id, rnd), horizon)
        except UploadRejectedError as exc:
            if exc.code == "not_a_survivor":
                log.info("secagg_not_a_survivor", detail=exc.detail[:200])
                return None
            raise


def _json_object(body: bytes) -> dict[str, object]:
    """An answer's JSON object, or {} for anything else (the aggregator's answer is data, never trusted further)."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _poll(fetch: Callable[[float], Awaitable[T | None]], deadline: float | None) -> T | None:
    """Long-poll `fetch(wait)` until it returns something or `deadline` passes (None at the deadline)."""
    while True:
        wait = MAX_WAIT_S if deadline is None else min(MAX_WAIT_S, deadline - time.time())
        if wait <= 0:
            return None
        started = time.monotonic()
        got = await retrying(functools.partial(fetch, wait), deadline)
        if got is not None:
            return got
        await asyncio.sleep(max(0.0, min(wait, MIN_POLL_S) - (time.monotonic() - started)))

