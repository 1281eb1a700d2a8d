"""Experiment tracking: one interface, several sinks (local files, SageMaker Experiments).

The aggregator's job-event worker (`aggregator.jobevents`, never the round engine itself) calls
`TrackingHub.on_round` after each finished round with what that round added, and `on_summary` with a job's whole
summary when it ends (and for each running job at start-up, to catch up on anything a crash kept from being
queued). The hub turns them into records (`records`), commits those to a SQLite outbox on a thread of its own and
returns: training never waits on a tracker, and a round costs O(its sites) whatever the job's history. One
background task per sink drains the outbox on a thread of its own, retrying a failing sink with exponential
backoff, counting failures in `/metrics` (`fedsilo_tracking_*`) and logging once when a sink starts failing and
once when it recovers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from aggregator.store import sqlite_path
from aggregator.tracking.config import TrackingConfig
from aggregator.tracking.outbox import Outbox
from aggregator.tracking.records import records_for, round_records, sharing_sites
from aggregator.tracking.sink import Record, RunRef, TrackingSink, deliver

__all__ = ["TrackingConfig", "TrackingHub", "TrackingSink", "default_outbox", "make_sinks"]

log = structlog.get_logger(__name__)


def default_outbox(config: TrackingConfig, state_url: str, report_dir: Path) -> Path:
    """The configured outbox, else beside the SQLite state database, else in the report directory."""
    if config.outbox is not None:
        return config.outbox
    state_db = sqlite_path(state_url)
    if state_db is not None:
        return state_db.parent / "tracking-outbox.db"
    return report_dir / ".tracking-outbox.db"


def make_sinks(config: TrackingConfig, report_dir: Path) -> list[TrackingSink]:
    sinks: list[TrackingSink] = []
    if config.local.enabled:
        from aggregator.tracking.local import LocalSink

        sinks.append(LocalSink(report_dir))
    if config.sagemaker is not None and config.sagemaker.enabled:
        from aggregator.tracking.sagemaker import SageMakerSink

        sinks.append(SageMakerSink(config.sagemaker))
    return sinks


@dataclass
class _SinkState:
    sink: TrackingSink
    pool: ThreadPoolExecutor
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0  # consecutive failed deliveries (the current burst)
    failing_since: float = 0.0
    pending: int = 0  # records in the outbox not yet delivered (counted once at start, then kept here)
    task: asyncio.Task[None] | None = None


class TrackingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queued = Counter("fedsilo_tracking_records_queued", "Tracking records committed to the outbox.",
                              ["sink"], registry=r)
        self.delivered = Counter("fedsilo_tracking_records_delivered", "Tracking records a sink accepted.",
                                 ["sink"], registry=r)
        self.failures = Counter("fedsilo_tracking_failures", "Failed deliveries to a tracking sink (each retry "
                                "counts).", ["sink"], registry=r)
        self.pending = Gauge("fedsilo_tracking_pending_records", "Records waiting in the outbox.", ["sink"],
                             registry=r)
        self.up = Gauge("fedsilo_tracking_sink_up", "0 while a sink's deliveries fail, else 1.", ["sink"],
                        registry=r)


class TrackingHub:
    def __init__(
        self,
        config: TrackingConfig,
        registry: CollectorRegistry,
        report_dir: Path | None = None,
        state_url: str = "",
        sinks: list[TrackingSink] | None = None,
    ) -> None:
        self._config = config
        self._report_dir = report_dir
        self._metrics = TrackingMetrics(registry)
        if sinks is None:
            sinks = make_sinks(config, report_dir) if report_dir is not None else []
        self._sinks: dict[str, _SinkState] = {}
        for s in sinks:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tracking-{s.name}")
            self._sinks[s.name] = _SinkState(s, pool)
            self._metrics.up.labels(s.name).set(1)
        self._outbox_path = default_outbox(config, state_url, report_dir or Path("."))
        self._outbox: Outbox | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking-outbox")
        self._closing = False
        # Per running job, the sites that withheld tracking in one of their updates: they get no more records.
        self._withheld: dict[str, set[str]] = {}

    @property
    def sink_names(self) -> list[str]:
        return list(self._sinks)

    async def _run_db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    def _open(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(self._outbox_path)
        return self._outbox

    async def start(self) -> None:
        """Open the outbox and start draining it (records left from a previous run go first)."""
        if not self._sinks or self._closing:
            return
        first = self._outbox is None
        await self._run_db(self._open)
        if first:
            await self._run_db(lambda: self._open().prune(self._config.keep_delivered_days * 86_400.0))
        for state in self._sinks.values():
            if state.task is None:
                state.pending = await self._run_db(lambda s=state: self._open().count_pending(s.sink.name))
                self._metrics.pending.labels(state.sink.name).set(state.pending)
                state.task = asyncio.create_task(self._drain(state), name=f"tracking-{state.sink.name}")
            state.wake.set()

    async def on_round(
        self, job_id: str, spec: dict[str, Any], rnd: int, sites: dict[str, dict[str, Any]],
        evaluations: dict[str, dict[str, Any]], global_metrics: dict[str, Any] | None,
    ) -> None:
        """What round `rnd` of a job added (see `records.round_records`). Never raises."""
        if not self._sinks or self._closing:
            return
        withheld = self._withheld.setdefault(job_id, set())
        await self._enqueue(job_id, "round_closed", lambda: round_records(
            job_id, spec, self._config.experiment_prefix, rnd, sites, evaluations, global_metrics, withheld))

    async def on_summary(self, summary: dict[str, Any]) -> None:
        """Everything a job's summary implies (`records.records_for`; what is queued already is skipped).
        Never raises: tracking must not fail a job."""
        if not self._sinks or self._closing:
            return
        job_id = summary["job_id"]
        if summary["state"] in ("offered", "running"):
            ever = {s for t in summary["training"] for s, info in t["sites"].items()}
            self._withheld[job_id] = ever - set(sharing_sites(summary))
        else:
            self._withheld.pop(job_id, None)
        await self._enqueue(job_id, summary["state"],
                            lambda: records_for(summary, self._config.experiment_prefix, self._report_dir))

    async def _enqueue(self, job_id: str, event: str, build: Callable[[], list[Record]]) -> None:
        try:
            await self.start()
            records = await self._run_db(build)  # O(sites) of Python: off the event loop
            for state in self._sinks.values():
                new = await self._run_db(lambda s=state: self._open().enqueue(s.sink.name, records))
                self._metrics.queued.labels(state.sink.name).inc(new)
                self._pending(state, new)
                state.wake.set()
        except Exception:
            log.exception("tracking_enqueue_failed", job=job_id, tracking_event=event)

    def _pending(self, state: _SinkState, change: int) -> None:
        state.pending = max(0, state.pending + change)
        self._metrics.pending.labels(state.sink.name).set(state.pending)

    async def _drain(self, state: _SinkState) -> None:
        while True:
            await state.wake.wait()
            state.wake.clear()
            while True:
                try:
                    more = await self._deliver_batch(state)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await asyncio.sleep(self._failed(state, exc))
                    continue
                self._recovered(state)
                if not more:
                    break

    async def _deliver_batch(self, state: _SinkState) -> bool:
        """Deliver up to `batch_size` pending records, run by run, then flush the sink once and mark them
        delivered; True when more may be waiting."""
        name = state.sink.name
        batch: list[tuple[int, Record]] = await self._run_db(
            lambda: self._open().pending(name, self._config.batch_size)
        )
        if not batch:
            return False
        runs: dict[tuple[str, str], tuple[RunRef, list[Record]]] = {}
        for _, rec in batch:
            runs.setdefault((rec.run.experiment, rec.run.name), (rec.run, []))[1].append(rec)
        await asyncio.get_running_loop().run_in_executor(state.pool, _deliver_all, state.sink, list(runs.values()))
        ids = [i for i, _ in batch]
        await self._run_db(lambda: self._open().mark_delivered(ids))
        self._metrics.delivered.labels(name).inc(len(ids))
        self._pending(state, -len(ids))
        return len(batch) >= self._config.batch_size

    def _failed(self, state: _SinkState, exc: Exception) -> float:
        """Count the failure, log the first of a burst only, and return the backoff delay."""
        state.failures += 1
        self._metrics.failures.labels(state.sink.name).inc()
        self._metrics.up.labels(state.sink.name).set(0)
        c = self._config
        delay: float = min(c.retry_max_s, c.retry_initial_s * 2.0 ** min(state.failures - 1, 30))
        delay *= random.uniform(0.8, 1.0)  # spread retries of many aggregators hitting one throttled account
        if state.failures == 1:
            state.failing_since = time.monotonic()
            log.warning("tracking_sink_failing", sink=state.sink.name, error=f"{type(exc).__name__}: {exc}"[:500],
                        retry_in_s=round(delay, 2), note="records stay in the outbox; logged once per burst")
        else:
            log.debug("tracking_sink_retry_failed", sink=state.sink.name, attempt=state.failures)
        return delay

    def _recovered(self, state: _SinkState) -> None:
        if state.failures:
            log.info("tracking_sink_recovered", sink=state.sink.name, failed_attempts=state.failures,
                     down_s=round(time.monotonic() - state.failing_since, 2))
        state.failures = 0
        self._metrics.up.labels(state.sink.name).set(1)

    async def flush(self, within_s: float) -> bool:
        """Try to deliver everything pending now; True when nothing is left."""
        left = False
        for state in self._sinks.values():
            try:
                async with asyncio.timeout(within_s):
                    while await self._deliver_batch(state):
                        pass
            except Exception as exc:  # TimeoutError included: what is left waits for the next start
                log.info("tracking_flush_incomplete", sink=state.sink.name, error=f"{type(exc).__name__}: {exc}"[:300])
                left = True
        return not left

    async def close(self) -> None:
        """Flush what can be flushed; keep the rest buffered durably for the next start."""
        self._closing = True
        for state in self._sinks.values():
            if state.task is not None:
                state.task.cancel()
                await asyncio.gather(state.task, return_exceptions=True)
        if self._outbox is not None and self._config.close_timeout_s > 0:
            await self.flush(self._config.close_timeout_s)
        for state in self._sinks.values():
            state.pool.shutdown(wait=False)
        if self._outbox is not None:
            await self._run_db(self._outbox.close)
        self._db.shutdown(wait=True)


def _deliver_all(sink: TrackingSink, runs: list[tuple[RunRef, list[Record]]]) -> None:
    for run, recs in runs:
        deliver(sink, run, recs)
    sink.flush()
