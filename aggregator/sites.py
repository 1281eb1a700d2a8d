"""Which sites are online: heartbeats and last wills from MQTT, a sweeper for agents that went silent, the gauges.

Separate from the round engine: a heartbeat touches no job, and thousands of sites send one every few seconds. So a
heartbeat only updates memory; what changed is written to the store in one transaction every `flush_s` (a site
sending ten thousand heartbeats costs one row write per flush, not ten thousand fsyncs), and the API, which reads
the store, lags by at most that. A heartbeat's time is the aggregator's receive time, never the site's clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from aggregator.db import Db
from aggregator.metrics import AggregatorMetrics
from federation.messages import SiteStatus

log = structlog.get_logger(__name__)


class SiteRegistry:
    def __init__(self, db: Db, metrics: AggregatorMetrics, flush_s: float = 2.0) -> None:
        self._db = db
        self._metrics = metrics
        self._flush_s = flush_s
        # Each site's last known (state, at, info): loaded at `load`, kept current by `on_status` and the sweeper.
        self._sites: dict[str, tuple[str, float, dict[str, Any]]] = {}
        self._dirty: set[str] = set()
        self._online = 0
        # Each site's latest audit-chain head (seq, sha256, at), and conflicts counted since the last flush.
        self._heads: dict[str, tuple[int, str, float]] = {}
        self._head_conflicts: dict[str, int] = {}
        self._heads_dirty: set[str] = set()

    async def load(self) -> None:
        for row in await self._db(self._db.store.sites):
            info = {k: v for k, v in row.items() if k not in ("site", "state", "at")}
            self._set(row["site"], row["state"], row["at"], info, dirty=False)
        for head in await self._db(self._db.store.audit_heads):
            self._heads[head["site"]] = (head["seq"], head["sha256"], head["at"])

    def on_audit_head(self, site: str, seq: int, sha: str, at: float) -> None:
        """A site's audit-chain head (in memory; flushed with the heartbeats). It only moves forward; the same entry
        count with another hash is a conflict: counted, logged, and the first head kept
        (`aggregator.store.audit_heads`)."""
        known = self._heads.get(site)
        if known is None or seq > known[0]:
            self._heads[site] = (seq, sha, at)
            self._heads_dirty.add(site)
        elif seq == known[0] and sha != known[1]:
            self._metrics.audit_head_conflicts.labels(site).inc()
            if not self._head_conflicts.get(site):  # one line per site per flush, however often it is repeated
                log.warning("audit_head_conflict", site=site, seq=seq, recorded=known[1], reported=sha)
            self._head_conflicts[site] = self._head_conflicts.get(site, 0) + 1
            self._heads_dirty.add(site)

    def on_status(self, status: SiteStatus, received_at: float | None = None) -> None:
        """A heartbeat, or the last will the broker publishes when an agent's connection drops."""
        reason = None if status.state == "online" else "connection lost (last will)"
        at = time.time() if received_at is None else received_at
        self._set(status.site, status.state, at,
                  {"active_jobs": status.active_jobs, "version": status.version, "offline_reason": reason})

    def sweep(self, timeout_s: float, now: float | None = None) -> list[str]:
        """Mark online sites whose last heartbeat is older than `timeout_s` offline (a hung agent or a network
        partition sends no last will); returns the sites marked."""
        now = time.time() if now is None else now
        marked = []
        for site, (state, at, info) in list(self._sites.items()):
            if state == "online" and now - at > timeout_s:
                reason = f"no heartbeat for {now - at:.0f} s (timeout {timeout_s:g} s)"
                self._set(site, "offline", at, {**info, "offline_reason": reason})
                log.warning("site_offline", site=site, reason=reason)
                marked.append(site)
        return marked

    async def flush(self) -> int:
        """Write every site that changed since the last flush; returns how many."""
        written = await self._flush_heads()
        if not self._dirty:
            return written
        rows = [(s, *self._sites[s]) for s in sorted(self._dirty)]
        self._dirty.clear()
        try:
            await self._db(self._db.store.upsert_sites, rows)
        except BaseException:
            self._dirty.update(r[0] for r in rows)  # written with the next flush
            raise
        return written + len(rows)

    async def _flush_heads(self) -> int:
        if not self._heads_dirty:
            return 0
        rows = [(s, *self._heads[s], self._head_conflicts.pop(s, 0)) for s in sorted(self._heads_dirty)]
        self._heads_dirty.clear()
        try:
            await self._db(self._db.store.record_audit_heads, rows)
        except BaseException:
            for site, *_, conflicts in rows:
                self._heads_dirty.add(site)
                self._head_conflicts[site] = self._head_conflicts.get(site, 0) + conflicts
            raise
        return len(rows)

    async def run(self, timeout_s: float) -> None:
        """Sweep (in memory) and flush what changed, every `flush_s` or a quarter of the timeout if shorter."""
        tick = min(self._flush_s, max(timeout_s / 4, 0.25))
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep(timeout_s)
                await self.flush()
            except Exception:  # a store hiccup must not end the loop
                log.exception("site_flush_failed")

    def _set(self, site: str, state: str, at: float, info: dict[str, Any], dirty: bool = True) -> None:
        old = self._sites.get(site)
        self._sites[site] = (state, at, info)
        if dirty:
            self._dirty.add(site)
        self._metrics.site_up.labels(site).set(1 if state == "online" else 0)
        self._metrics.site_last_seen.labels(site).set(at)
        was_online = old is not None and old[0] == "online"
        if was_online != (state == "online"):
            self._online += 1 if state == "online" else -1
            self._metrics.sites_online.set(self._online)
