"""What the round engine tells the rest of the aggregator, and the worker that acts on it off the engine's path.

The engine posts an event once a round's or a job's new state is durable, and goes on: it never waits for tracking
or a report, so uploads and operator calls never queue behind them. One worker task takes the events in order:

- `RoundClosed` becomes that round's tracking records, O(its sites), from what the engine already had in hand;
- `JobEnded` gets the job's report, written on a thread of its own from a store connection of its own, then the
  whole summary goes to tracking once (catching anything a crash kept from being queued). The store keeps a
  follow-up row for every ended job until this is done (`StateStore.followups`), so a crash or a shutdown before
  it finishes only delays it to the next start;
- `JobResumed` (posted by `recover` for each running job) sends the summary so far to tracking, for the same
  reason.

The queue is bounded. When it is full a `RoundClosed` is dropped and counted (the job's end catches its records
up); the other events are at most one per job and wait beside the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from aggregator.blobs import BlobStore
from aggregator.db import Db
from aggregator.leases import FOLLOWUP_TTL_S, LeaseSettings
from aggregator.metrics import AggregatorMetrics
from aggregator.report import write_report
from aggregator.runner import weighted
from aggregator.store import StateStore, UpdateRow
from aggregator.summary import job_summary
from aggregator.tracking import TrackingHub
from federation.jobs import JobSpec
from federation.messages import EvalMetrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RoundClosed:
    job_id: str
    spec: JobSpec
    round: int
    updates: tuple[UpdateRow, ...]  # the round's updates (none for the final evaluation round)
    evaluations: dict[str, EvalMetrics]  # each site's metrics of model version `round - 1`, now complete


@dataclass(frozen=True)
class JobEnded:
    job_id: str
    state: str


@dataclass(frozen=True)
class JobResumed:
    job_id: str


JobEvent = RoundClosed | JobEnded | JobResumed


class JobEventWorker:
    def __init__(
        self, db: Db, open_reader: Callable[[], StateStore], blobs: BlobStore, report_dir: Path,
        tracking: TrackingHub, metrics: AggregatorMetrics, maxsize: int = 10_000, lease: LeaseSettings | None = None,
    ) -> None:
        self._db = db
        self._open_reader = open_reader
        self._reader: StateStore | None = None
        self._blobs = blobs
        self._report_dir = report_dir
        self._tracking = tracking
        self._metrics = metrics
        self._queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize)
        self._beside: deque[JobEvent] = deque()  # job-level events that found the queue full
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing is queued or being handled
        self._idle.set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reports")
        self._task: asyncio.Task[None] | None = None
        self._dropping = False
        self._lease = lease
        self._claimed: set[str] = set()  # follow-ups taken up by this process

    def post(self, event: JobEvent) -> None:
        """Never blocks and never raises: called by the round engine under a job's lock."""
        try:
            self._queue.put_nowait(event)
            self._dropping = False
        except asyncio.QueueFull:
            if isinstance(event, RoundClosed):
                self._metrics.job_events_dropped.inc()
                if not self._dropping:
                    log.warning("job_event_dropped", job=event.job_id, round=event.round,
                                note="the queue is full; the job's end catches its tracking records up")
                self._dropping = True
            else:
                self._beside.append(event)
        self._idle.clear()
        self._wake.set()

    async def start(self) -> None:
        """Start the worker, first taking up the follow-ups of jobs that ended before the last stop."""
        await self.pick_up_followups()
        self._task = asyncio.create_task(self._run(), name="job-events")

    async def pick_up_followups(self) -> None:
        """Post the follow-ups no replica is doing: with leases, only those this replica claims (a replica that
        ended a job claimed its follow-up already; one that died lets it go after `FOLLOWUP_TTL_S`)."""
        for job_id, state in await self._db(self._db.store.followups):
            if job_id in self._claimed:
                continue
            if self._lease is not None and await self._db(
                    self._db.store.acquire_lease, self._lease.followup_key(job_id), self._lease.holder,
                    self._lease.address, FOLLOWUP_TTL_S) is None:
                continue
            self._claimed.add(job_id)
            self.post(JobEnded(job_id, state))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self._queue.empty() or self._beside:
                event = self._queue.get_nowait() if not self._queue.empty() else self._beside.popleft()
                with structlog.contextvars.bound_contextvars(job=event.job_id):
                    try:
                        await self._handle(event)
                    except Exception:  # a report or tracking failure must not end the worker
                        log.exception("job_event_failed", event=type(event).__name__)
            self._idle.set()

    async def _handle(self, event: JobEvent) -> None:
        if isinstance(event, RoundClosed):
            evals = {s: m.model_dump() for s, m in event.evaluations.items()}
            sites = {u.site: {"train_loss": u.train_loss, "num_samples": u.num_samples, "epsilon": u.epsilon,
                              "share_tracking": u.share_tracking} for u in event.updates}
            g = weighted(event.evaluations).model_dump() if event.evaluations else None
            await self._tracking.on_round(event.job_id, event.spec.model_dump(mode="json"), event.round, sites,
                                          evals, g)
            return
        if isinstance(event, JobEnded):
            summary = await self._on_thread(write_report, self._blobs, event.job_id, self._report_dir)
            log.info("report_written", path=str(self._report_dir / event.job_id))
        else:
            summary = await self._on_thread(job_summary, event.job_id)
        if summary is not None:
            await self._tracking.on_summary(summary)
        if isinstance(event, JobEnded):
            await self._db(self._db.store.followup_done, event.job_id)
            self._claimed.add(event.job_id)

    async def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(store, *args)` on the reports' thread, with the reports' own store connection."""

        def call() -> Any:
            if self._reader is None:
                self._reader = self._open_reader()
            return fn(self._reader, *args)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def close(self, within_s: float) -> None:
        """Finish what can be finished in `within_s`; follow-ups left over run at the next start."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), within_s)
            except TimeoutError:
                log.info("job_events_left_for_next_start", queued=self._queue.qsize() + len(self._beside))
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
