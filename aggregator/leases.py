"""Which jobs this aggregator replica writes: it takes the lease of every job no live replica holds, renews its own,
and lets go of any it lost (`aggregator.store.leases` has the lease rows and the fence every write checks).

With one replica (SQLite, or PostgreSQL without a second pod) it simply holds every job; a restarted replica with
the same `replica_id` takes its jobs back at once. With several, a replica that dies or stops renewing (paused,
partitioned from the database) loses its jobs after `lease_ttl_s`, and the first other replica to look takes them
over, resuming each from the store as a restart would.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import structlog

from aggregator.db import Db
from aggregator.store.leases import Fence

log = structlog.get_logger(__name__)
FOLLOWUP_TTL_S = 600.0  # a job's report and tracking follow-up, claimed by one replica at a time


@dataclass(frozen=True)
class LeaseSettings:
    holder: str  # this replica's id: unique among live replicas, stable across its restarts
    address: str  # the base URL other replicas forward a job's requests to
    ttl_s: float

    def followup_key(self, job_id: str) -> str:
        return f"followup:{job_id}"


class Writer(Protocol):
    """What the keeper needs of the round engine."""

    def fences(self) -> list[Fence]: ...

    def runs(self, job_id: str) -> bool: ...

    def lose(self, job_id: str, reason: str) -> None: ...

    async def take(self, job_id: str, fence: Fence) -> None: ...


class FollowUps(Protocol):
    async def pick_up_followups(self) -> None: ...


class LeaseKeeper:
    """Every `ttl_s / 4`: renew the leases held, drop the jobs whose lease is gone, take the free ones, and take up
    the follow-ups (reports) a dead replica left."""

    def __init__(self, db: Db, engine: Writer, settings: LeaseSettings, followups: FollowUps) -> None:
        self._db, self._engine, self._s, self._followups = db, engine, settings, followups

    async def step(self) -> None:
        engine = self._engine
        fences = engine.fences()
        if fences:
            held = await self._db(self._db.store.renew_leases, fences, self._s.ttl_s)
            for f in fences:
                if f.job_id not in held:
                    engine.lose(f.job_id, "its lease was not renewed in time; another replica may hold it")
        for job_id in await self._db(self._db.store.takeable_jobs, self._s.holder):
            if engine.runs(job_id):
                continue
            token = await self._db(self._db.store.acquire_lease, job_id, self._s.holder, self._s.address,
                                   self._s.ttl_s)
            if token is not None:
                log.info("lease_taken", job=job_id, token=token)
                await engine.take(job_id, Fence(job_id, self._s.holder, token))
        await self._followups.pick_up_followups()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._s.ttl_s / 4)
            try:
                await self.step()
            except Exception:  # a database hiccup must not end the loop: the next step retries
                log.exception("lease_step_failed")
