"""The egress gate: the only code path by which bytes leave the agent.

HTTP goes only to the configured aggregator, over mutual TLS, and only if its host:port is on the policy's
allowlist; uploads must be `PrivatizedUpdate`s made by the privacy engine and fit the per-round size limit;
metrics leave only if the policy allows each one and they aggregate at least `min_records_per_metric`
records. Secure aggregation's messages (sealed shares, reveals) leave only under this site's own name. MQTT
carries only this site's status and job answers, whose reasons name datasets by id, never by a local path
(`agent.offsite`). Every refusal is audited.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import structlog

from agent.audit import AuditLog
from agent.offsite import OffsiteText
from agent.policy import EgressPolicy, endpoint_of
from agent.privacy import PrivatizedUpdate
from federation import topics
from federation.messages import (
    ENVELOPE_HEADER,
    EvalMetrics,
    EvaluationReport,
    SiteEvent,
    SiteStatus,
    blob_path,
    canonical_json,
    evaluation_path,
    update_path,
)
from federation.mqtt import MqttLink
from federation.secagg.messages import (
    MAX_WAIT_S,
    Reveal,
    ShareBundle,
    UnmaskWork,
    reveal_path,
    roster_path,
    shares_path,
    unmask_path,
)
from federation.tensors import sha256_hex
from federation.transport import TLSConfig

log = structlog.get_logger(__name__)
RETRY_MAX_S = 4.0  # the aggregator restarts in seconds; a longer backoff would only idle the site
T = TypeVar("T")


class EgressRefusedError(Exception):
    """The gate refused to send: what was asked is not an allowed release."""


class UploadRejectedError(Exception):
    """The aggregator answered 4xx: retrying the same bytes cannot succeed."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


async def retrying(call: Callable[[], Awaitable[T]], deadline: float | None) -> T:
    """Retry transient failures (network, 5xx) with backoff until `deadline` (a `time.time()`; None: forever);
    past it, `UploadRejectedError` "deadline_passed". A 4xx is final and raised at once."""
    delay = 0.25
    while True:
        try:
            return await call()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientResponseError) and exc.status < 500:
                raise
            if deadline is not None and time.time() + delay > deadline:
                raise UploadRejectedError(0, "deadline_passed", f"gave up: {exc}") from exc
            log.warning("aggregator_unreachable", error=str(exc)[:200], retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


class EgressGate:
    def __init__(
        self, site: str, aggregator_url: str, tls: TLSConfig, link: MqttLink, policy: EgressPolicy,
        audit: AuditLog,
        on_refusal: Callable[[str], None] | None = None,
        offsite: Callable[[str], str] | None = None,
    ) -> None:
        self._site = site
        self._base = aggregator_url.rstrip("/")
        self._endpoint = endpoint_of(self._base)
        self._ssl: ssl.SSLContext = tls.client_context()
        self._link = link
        self._policy = policy
        self._audit = audit
        self._on_refusal = on_refusal
        self._offsite = offsite or OffsiteText({})
        self._session: aiohttp.ClientSession | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=4, keepalive_timeout=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _refuse(self, what: str, reason: str, **detail: Any) -> EgressRefusedError:
        self._audit.append("egress_refused", what=what, reason=reason, **detail)
        if self._on_refusal is not None:
            self._on_refusal(what)
        log.warning("egress_refused", what=what, reason=reason, **detail)
        return EgressRefusedError(reason)

    # ---------------------------------------------------------------- MQTT
    def publish_status(self, status: SiteStatus) -> None:
        if status.site != self._site:
            raise self._refuse("status", "status for another site", claimed=status.site)
        self._link.publish(topics.status(self._site), canonical_json(status), retain=True)

    def publish_event(self, event: SiteEvent) -> None:
        if event.site != self._site:
            raise self._refuse("event", "event for another site", claimed=event.site)
        reasons = [self._offsite(r) for r in event.reasons]
        if reasons != event.reasons:
            event = event.model_copy(update={"reasons": reasons})
        self._link.publish(topics.events(self._site), canonical_json(event))

    # ---------------------------------------------------------------- checks
    def check_metrics(self, evaluation: EvalMetrics | None, job_id: str) -> None:
        if evaluation is None:
            return
        present = [name for name in ("auc", "loss") if getattr(evaluation, name) is not None]
        self.check_metric_names(present, job_id)
        if present and evaluation.n < self._policy.min_records_per_metric:
            raise self._refuse("metrics", f"metrics over {evaluation.n} records; the policy requires at least "
                               f"{self._policy.min_records_per_metric}", job=job_id)

    def check_metric_names(self, names: list[str], job_id: str) -> None:
        bad = [n for n in names if n not in self._policy.allowed_metrics]
        if bad:
            raise self._refuse("metrics", f"metric(s) {bad} are not allowed to leave", job=job_id)

    # ---------------------------------------------------------------- HTTP
    async def fetch_model(self, sha: str) -> bytes:
        """Download a global model and verify it is the one the signed task named."""
        body = await self._request("GET", blob_path(sha))
        if sha256_hex(body) != sha:
            raise ValueError(f"model {sha[:12]}… failed its hash check")
        return body

    async def send_update(self, update: PrivatizedUpdate) -> bytes:
        if not isinstance(update, PrivatizedUpdate):
            raise self._refuse("update", "only privatized updates may be uploaded", type=type(update).__name__)
        limit = self._policy.max_upload_bytes_per_round
        if len(update.payload) > limit:
            raise self._refuse("update", f"update of {len(update.payload)} bytes exceeds the {limit}-byte limit",
                               job=update.job_id, round=update.round)
        self.check_metrics(update.envelope.evaluation, update.job_id)
        headers = {ENVELOPE_HEADER: update.envelope.model_dump_json(), "Content-Type": "application/octet-stream"}
        return await self._request("POST", update_path(update.job_id, update.round), update.payload, headers)

    async def send_evaluation(self, report: EvaluationReport) -> bytes:
        if report.site != self._site:
            raise self._refuse("evaluation", "evaluation for another site", claimed=report.site)
        self.check_metrics(report.evaluation, report.job_id)
        body = canonical_json(report)
        headers = {"Content-Type": "application/json"}
        return await self._request("POST", evaluation_path(report.job_id, report.round), body, headers)

    # ---------------------------------------------------------------- secure aggregation
    async def send_shares(self, bundle: ShareBundle, wait: float = 0.0) -> bytes:
        """Post this round's mask key and sealed shares (the aggregator can open none of them). With `wait` > 0 the
        answer may carry the signed roster (`roster`), for the caller to verify."""
        if bundle.site != self._site:
            raise self._refuse("secagg_shares", "shares for another site", claimed=bundle.site)
        wait = min(max(wait, 0.0), MAX_WAIT_S)
        query = f"?wait={wait:.3f}" if wait > 0 else ""
        return await self._request("POST", shares_path(bundle.job_id, bundle.round) + query, canonical_json(bundle),
                                   {"Content-Type": "application/json"})

    async def fetch_roster(self, job_id: str, rnd: int, wait: float) -> bytes | None:
        """The signed roster's bytes (the caller verifies them), or None while it is not frozen after `wait` s."""
        return await self._long_poll(roster_path(job_id, rnd), wait)

    async def fetch_unmask(self, job_id: str, rnd: int, wait: float) -> UnmaskWork | None:
        """This site's unmask work (the caller verifies its signed request), or None while there is none yet."""
        body = await self._long_poll(unmask_path(job_id, rnd), wait)
        return None if body is None else UnmaskWork.model_validate_json(body)

    async def send_reveal(self, reveal: Reveal) -> bytes:
        if reveal.site != self._site:
            raise self._refuse("secagg_reveal", "a reveal for another site", claimed=reveal.site)
        return await self._request("POST", reveal_path(reveal.job_id, reveal.round), canonical_json(reveal),
                                   {"Content-Type": "application/json"})

    async def _long_poll(self, path: str, wait: float) -> bytes | None:
        wait = min(max(wait, 0.0), MAX_WAIT_S)
        status, body = await self._exchange("GET", f"{path}?wait={wait:.3f}")
        return None if status == 202 else body

    async def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> bytes:
        return (await self._exchange(method, path, body, headers))[1]

    async def _exchange(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self._endpoint not in self._policy.allowed_endpoints:
            raise self._refuse("http", f"endpoint {self._endpoint} is not on the egress allowlist", path=path)
        assert self._session is not None, "EgressGate.start() was not called"
        async with self._session.request(method, self._base + path, data=body, headers=headers) as resp:
            data = await resp.read()
            self.bytes_sent += len(body or b"")
            self.bytes_received += len(data)
            if 400 <= resp.status < 500:
                try:
                    err = await resp.json(content_type=None)
                    code, detail = str(err.get("error")), str(err.get("detail"))
                except (ValueError, AttributeError):
                    code, detail = "http_error", data[:200].decode(errors="replace")
                raise UploadRejectedError(resp.status, code, detail)
            resp.raise_for_status()
            return resp.status, data
