"""Experiment tracking: one interface, several sinks (local report, SageMaker Experiments, ...).

The aggregator calls `TrackingHub.on_job_event` after each finished round and when a job ends, with the job's
summary (`aggregator.report.job_summary`). A sink failure never fails or stalls training.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from aggregator.tracking.config import TrackingConfig


class TrackingHub:
    def __init__(self, config: TrackingConfig, registry: CollectorRegistry) -> None:
        self._config = config

    async def on_job_event(self, event: str, summary: dict[str, Any]) -> None:
        """`event` is "round_closed", "finished", "failed" or "cancelled"."""

    async def close(self) -> None:
        """Flush what can be flushed; keep the rest buffered durably for the next start."""
