"""Limits on what a site sends over MQTT, applied before a message is even parsed.

A site's certificate lets it publish on its own status and events topics only (the broker's ACL), but as often and
as large as it likes. Here every message is size-checked, then charged to a per-site token bucket: a site that
floods is dropped, counted and logged (a line per site and reason at most every `LOG_EVERY_S`), and costs the
aggregator a dictionary lookup per message, never a store write.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from aggregator.metrics import AggregatorMetrics
from aggregator.sites import SiteRegistry
from federation import topics
from federation.messages import SiteEvent, SiteStatus
from federation.schema import field_errors

log = structlog.get_logger(__name__)
LOG_EVERY_S = 30.0


@dataclass
class _Bucket:
    tokens: float
    at: float


class IngressLimiter:
    def __init__(self, max_bytes: int, rate_per_s: float, burst: int, max_sites: int = 100_000) -> None:
        self.max_bytes = max_bytes
        self._rate, self._burst, self._max_sites = rate_per_s, float(burst), max_sites
        # Least recently heard site first: with more sites than `max_sites` the oldest bucket is forgotten (it
        # would be full again by now anyway unless the site is flooding, and then it is heard often).
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def admit(self, site: str, size: int, now: float | None = None) -> str | None:
        """None when the message may be handled; else the reason it is dropped (`too_large`, `rate_limited`)."""
        if size > self.max_bytes:
            return "too_large"
        now = time.monotonic() if now is None else now
        b = self._buckets.get(site)
        if b is None:
            b = self._buckets[site] = _Bucket(self._burst, now)
            if len(self._buckets) > self._max_sites:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(site)
            b.tokens = min(self._burst, b.tokens + (now - b.at) * self._rate)
            b.at = now
        if b.tokens < 1.0:
            return "rate_limited"
        b.tokens -= 1.0
        return None


class RateLimitedLog:
    """Logs a warning for a (key) at most once every `every_s`, with how many were suppressed in between: a flood
    of bad input must not become a flood of log lines. Fields are truncated to `max_chars`."""

    def __init__(self, every_s: float = LOG_EVERY_S, max_keys: int = 10_000, max_chars: int = 200) -> None:
        self._every_s, self._max_keys, self._max_chars = every_s, max_keys, max_chars
        self._last: OrderedDict[tuple[str, ...], tuple[float, int]] = OrderedDict()

    def warning(self, event: str, key: tuple[str, ...], now: float | None = None, **fields: object) -> bool:
        """True when the line was written."""
        now = time.monotonic() if now is None else now
        last, suppressed = self._last.get(key, (-float("inf"), 0))
        if now - last < self._every_s:
            self._last[key] = (last, suppressed + 1)
            return False
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        if len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        clean = {k: (v[: self._max_chars] if isinstance(v, str) else v) for k, v in fields.items()}
        log.warning(event, suppressed_since_last=suppressed, **clean)
        return True


def one_line(exc: ValidationError) -> str:
    return "; ".join(f"{field or '(message)'}: {msg}" for field, msg in field_errors(exc))


class SiteInbox:
    """MQTT messages from sites: limited before they are parsed, checked against the topic they came on, stamped
    with the aggregator's receive time (a site's clock is not trusted), then handed on: heartbeats to the site
    registry (memory only), job answers to the round engine (at most `max_pending` at once)."""

    def __init__(
        self, limiter: IngressLimiter, sites: SiteRegistry, on_event: Callable[[SiteEvent], Awaitable[None]],
        metrics: AggregatorMetrics, max_pending: int = 1000,
    ) -> None:
        self._limiter, self._sites, self._on_event, self._metrics = limiter, sites, on_event, metrics
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLog()

    def __call__(self, topic: str, payload: bytes) -> None:
        site = topics.site_of(topic) or "unknown"
        kind = "status" if topic.endswith("/status") else "event"
        if kind == "status" and not payload:
            return  # a cleared retained status
        reason = self._limiter.admit(site, len(payload))
        if reason is None and kind == "event" and len(self._pending) >= self._max_pending:
            reason = "overloaded"
        if reason is not None:
            return self._drop(site, kind, reason, f"{len(payload)} bytes")
        now = time.time()
        try:
            model: type[SiteStatus] | type[SiteEvent] = SiteStatus if kind == "status" else SiteEvent
            msg = model.model_validate_json(payload).model_copy(update={"at": now})
        except ValidationError as exc:
            return self._drop(site, kind, "malformed", one_line(exc))
        if msg.site != site:  # the broker's ACL ties a topic to one site; the payload must agree
            return self._drop(site, kind, "site_mismatch", f"the message claims {msg.site!r}")
        if msg.audit_seq is not None and msg.audit_head is not None:
            self._sites.on_audit_head(site, msg.audit_seq, msg.audit_head, now)
        if isinstance(msg, SiteStatus):
            self._sites.on_status(msg, received_at=now)
            return None
        task = asyncio.ensure_future(self._on_event(msg))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return None

    def _drop(self, site: str, kind: str, reason: str, detail: str) -> None:
        self._metrics.site_messages_rejected.labels(site, reason).inc()
        self._log.warning("mqtt_message_rejected", (site, reason), site=site, kind=kind, reason=reason, detail=detail)
