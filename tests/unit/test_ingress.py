"""MQTT ingress limits: a site that floods or sends oversized messages is cut off per site, before parsing, and
its heartbeats cost memory updates, not store writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from aggregator.db import Db
from aggregator.ingress import IngressLimiter, RateLimitedLog
from aggregator.metrics import AggregatorMetrics
from aggregator.sites import SiteRegistry
from aggregator.store import open_store
from federation.messages import SiteStatus


def test_each_site_has_a_bucket_of_its_own() -> None:
    limiter = IngressLimiter(max_bytes=100, rate_per_s=2.0, burst=5)
    assert [limiter.admit("mallory", 10, now=0.0) for _ in range(7)] == [None] * 5 + ["rate_limited"] * 2
    assert limiter.admit("cleveland", 10, now=0.0) is None  # another site is not charged for mallory's flood
    assert limiter.admit("mallory", 10, now=1.0) is None  # two tokens a second come back
    assert limiter.admit("mallory", 10, now=1.0) is None
    assert limiter.admit("mallory", 10, now=1.0) == "rate_limited"
    assert limiter.admit("cleveland", 101, now=5.0) == "too_large"


def test_the_number_of_buckets_is_bounded() -> None:
    limiter = IngressLimiter(max_bytes=100, rate_per_s=1.0, burst=1, max_sites=3)
    for i in range(10):
        limiter.admit(f"site-{i}", 1, now=0.0)
    assert len(limiter._buckets) == 3


def test_a_flood_of_bad_input_logs_a_line_per_interval() -> None:
    rl = RateLimitedLog(every_s=30.0)
    with structlog.testing.capture_logs() as logs:
        written = [rl.warning("rejected", ("mallory", "malformed"), now=float(t), detail="x" * 1000)
                   for t in range(100)]
        assert rl.warning("rejected", ("cleveland", "malformed"), now=99.0)  # another key has its own interval
    assert [t for t, w in enumerate(written) if w] == [0, 30, 60, 90]
    assert len(logs) == 5 and len(logs[0]["detail"]) == 200 and logs[1]["suppressed_since_last"] == 29


def test_ten_thousand_heartbeats_are_one_row_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    db = Db(open_store(url))
    writes = 0
    upsert = db.store.upsert_sites

    def counting(rows: list[tuple[str, str, float, dict[str, object]]]) -> None:
        nonlocal writes
        writes += 1
        upsert(rows)

    db.store.upsert_sites = counting  # type: ignore[method-assign]
    sites = SiteRegistry(db, AggregatorMetrics())

    async def run() -> None:
        for i in range(10_000):
            sites.on_status(SiteStatus(site="mallory", state="online", at=1e300), received_at=1000.0 + i)
        assert await sites.flush() == 1
        assert await sites.flush() == 0  # nothing changed since
        assert sites.sweep(timeout_s=30.0, now=1000.0 + 10_000 + 31) == ["mallory"]
        await sites.flush()

    asyncio.run(run())
    assert writes == 2
    [row] = db.store.sites()
    assert row["state"] == "offline" and row["at"] == 1000.0 + 9_999  # the receive time, never the site's clock
    db.shutdown()
