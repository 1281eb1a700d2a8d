"""Which sites are online: heartbeats and last wills from MQTT, a sweeper for agents that went silent, the gauges.

Separate from the round engine: a heartbeat touches no job, and thousands of sites send one every few seconds.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from aggregator.db import Db
from aggregator.metrics import AggregatorMetrics
from federation.messages import SiteStatus

log = structlog.get_logger(__name__)


class SiteRegistry:
    def __init__(self, db: Db, metrics: AggregatorMetrics) -> None:
        self._db = db
        self._metrics = metrics
        # Each site's last known state, for the sites-online gauge: a heartbeat then costs one row write, not a
        # scan of every site. Loaded from the store at `load`.
        self._states: dict[str, str] = {}

    async def load(self) -> None:
        for row in await self._db(self._db.store.sites):
            self._seen(row["site"], row["state"], row["at"])

    async def on_status(self, status: SiteStatus) -> None:
        """A heartbeat, or the last will the broker publishes when an agent's connection drops."""
        reason = None if status.state == "online" else "connection lost (last will)"
        await self._db(
            self._db.store.upsert_site, status.site, status.state, status.at,
            {"active_jobs": status.active_jobs, "version": status.version, "offline_reason": reason},
        )
        self._seen(status.site, status.state, status.at)

    async def sweep(self, timeout_s: float, now: float | None = None) -> list[str]:
        """Mark online sites whose last heartbeat is older than `timeout_s` offline (a hung agent or a network
        partition sends no last will); returns the sites marked."""
        now = time.time() if now is None else now
        marked = []
        for row in await self._db(self._db.store.sites):
            if row["state"] == "online" and now - row["at"] > timeout_s:
                info = {k: v for k, v in row.items() if k not in ("site", "state", "at")}
                info["offline_reason"] = f"no heartbeat for {now - row['at']:.0f} s (timeout {timeout_s:g} s)"
                await self._db(self._db.store.upsert_site, row["site"], "offline", row["at"], info)
                self._seen(row["site"], "offline", row["at"])
                log.warning("site_offline", site=row["site"], reason=info["offline_reason"])
                marked.append(row["site"])
        return marked

    async def run_sweeper(self, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(max(timeout_s / 4, 0.25))
            try:
                await self.sweep(timeout_s)
            except Exception:  # a store hiccup must not end the sweeper
                log.exception("site_sweep_failed")

    def _seen(self, site: str, state: str, at: float) -> None:
        """Keep the site gauges in step with the store's row just written."""
        self._metrics.site_up.labels(site).set(1 if state == "online" else 0)
        self._metrics.site_last_seen.labels(site).set(at)
        if self._states.get(site) != state:
            self._states[site] = state
            self._metrics.sites_online.set(sum(1 for s in self._states.values() if s == "online"))
