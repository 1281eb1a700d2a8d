"""The tracking interface every sink implements, and the records the outbox carries to it.

Sink methods are blocking and may raise: the hub calls them on a worker thread, one run at a time
(`start_run`, then the run's records, then `end_run`), then `flush` once per batch of runs, and retries the whole
batch when anything raises, so every method must be safe to repeat (parameters overwrite, a metric point is keyed
by name and step).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field

from federation.schema import Frozen

Param = str | int | float


class RunRef(Frozen):
    """One run of one job's experiment: `aggregator`, or `client-<site>` for a site that shares tracking."""

    job_id: str
    experiment: str
    name: str


class Record(Frozen):
    """One thing to log. `key` makes enqueueing idempotent: the same record is never queued twice."""

    key: str
    run: RunRef
    kind: Literal["params", "metric", "artifact", "end"]
    params: dict[str, Param] = Field(default_factory=dict)
    name: str = ""
    value: float = 0.0
    step: int = 0
    path: str = ""
    status: Literal["finished", "failed", "cancelled"] = "finished"


class TrackingSink(Protocol):
    """Start a run, log parameters, log a metric with its step, log an artifact, end the run."""

    name: str

    def start_run(self, run: RunRef) -> None: ...

    def log_parameters(self, params: Mapping[str, Param]) -> None: ...

    def log_metric(self, name: str, value: float, step: int) -> None: ...

    def log_artifact(self, name: str, path: Path) -> None: ...

    def end_run(self, ok: bool, final_status: str | None = None) -> None:
        """Close what `start_run` opened. `ok` is False when the delivery failed part-way (the sink releases
        what it holds and the records are retried); `final_status` is set when the job itself ended."""
        ...

    def flush(self) -> None:
        """Make everything logged since the last flush durable: the hub marks the batch delivered next."""
        ...


def deliver(sink: TrackingSink, run: RunRef, records: list[Record]) -> None:
    """Hand one run's records to a sink, in order; raises when the sink does."""
    sink.start_run(run)
    final: str | None = None
    try:
        for r in records:
            if r.kind == "params":
                sink.log_parameters(r.params)
            elif r.kind == "metric":
                sink.log_metric(r.name, r.value, r.step)
            elif r.kind == "artifact":
                sink.log_artifact(r.name, Path(r.path))
            else:
                final = r.status
    except BaseException:
        sink.end_run(False)
        raise
    sink.end_run(True, final)
