"""Waiting for a condition in a test: poll it, and fail with what was awaited once the time is up.

A wait that silently gives up lets the test go on in the wrong state and pass for the wrong reason; these raise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fedsilo.local import LocalFederation


def wait_for(cond: Callable[[], bool], within: float = 60.0, what: str = "condition", every: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(every)


async def until(cond: Callable[[], bool], within: float = 10.0, what: str = "condition") -> float:
    """The same inside an event loop; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def wait_round(fed: LocalFederation, job_id: str, rnd: int, within: float = 60.0) -> None:
    """Until the job's current round is at least `rnd`."""
    wait_for(lambda: fed.client.job(job_id)["round"] >= rnd, within, f"job {job_id} to reach round {rnd}")
