"""The aggregator's HTTP API (aiohttp): what every endpoint shares (app keys, strict JSON answers, errors,
authorization, refusals, body timeouts), and the operations endpoints (`/healthz`, `/metrics`, `/openapi.json`).
The operators' endpoints are in `api_operators.py`, the sites' in `api_sites.py`.

Every refused request is answered with a reason code and a sentence, counted and logged (`reject`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from aggregator import openapi
from aggregator.auth import Identity, OperatorTokens, Role, TokenRefusal, certificate_identity, operator_identity
from aggregator.blobs import BlobStore, BlobStoreError
from aggregator.db import Db
from aggregator.engine import RoundEngine
from aggregator.forward import FORWARDED_OPERATOR, FORWARDED_SITE, Forwarder
from aggregator.ingress import RateLimitedLog
from aggregator.leases import LeaseSettings
from aggregator.metrics import AggregatorMetrics
from aggregator.store.leases import FencedOut
from aggregator.store.sql import UnreadableRow
from aggregator.validation import Rejection
from federation.jobs import SITE_NAME
from federation.schema import field_errors

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINE: web.AppKey[RoundEngine] = web.AppKey("engine", RoundEngine)
DB: web.AppKey[Db] = web.AppKey("db", Db)
BLOBS: web.AppKey[BlobStore] = web.AppKey("blobs", BlobStore)
METRICS: web.AppKey[AggregatorMetrics] = web.AppKey("metrics", AggregatorMetrics)
MAX_UPLOAD: web.AppKey[int] = web.AppKey("max_upload", int)
TOKENS: web.AppKey[OperatorTokens] = web.AppKey("tokens", OperatorTokens)
# Called with the reason of each refused bearer token (counted in /metrics by `aggregator.revocation`).
TOKEN_REFUSED: web.AppKey[Callable[[str], None]] = web.AppKey("token_refused")
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)
MAX_PARAMS: web.AppKey[int] = web.AppKey("max_params", int)
MAX_PUBLISH: web.AppKey[int] = web.AppKey("max_publish", int)
LEASE: web.AppKey[LeaseSettings] = web.AppKey("lease", LeaseSettings)
FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder", Forwarder)
METRICS_ELSEWHERE: web.AppKey[bool] = web.AppKey("metrics_elsewhere", bool)
# After an upload larger than this the connection is closed. An idle kept-alive TLS connection keeps buffers in
# proportion to the last large body it carried (bench/scale.py: ≈1.7 MB per idle connection after 4 MB uploads,
# so memory grew with the number of sites); a handshake per round costs little next to such a body, while small
# models (the common case, and the latency benchmark) keep their persistent connections.
CLOSE_AFTER_BYTES = 1 << 20
OPERATOR = "fedsilo.operator"
routes = web.RouteTableDef()


def json_response(data: Any, status: int = 200) -> web.Response:
    """Strict JSON: NaN and Infinity are not JSON, and a client (the console's JSON.parse) must never be handed
    them; the boundary checks keep them out of the store, and should one slip through it is a server error here,
    never an unparseable answer."""
    return web.json_response(data, status=status, dumps=_strict_dumps)


def _strict_dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False)


def error(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return json_response({"error": code, "detail": detail, **extra}, status=status)


@web.middleware
async def storage_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Storage trouble is a clear answer, never a traceback: a stored row that fails its checks (see
    `aggregator.store.checks`) is a 500 naming it; an unreachable or failing blob store a 503 the caller retries
    (agents do)."""
    try:
        return await handler(request)
    except UnreadableRow as exc:
        log.error("unreadable_row", path=request.path, error=str(exc)[:500])
        return error(500, "unreadable_state", str(exc)[:500])
    except FencedOut as exc:  # this replica lost the job's lease mid-request: its new writer takes the retry
        log.warning("write_refused_by_fence", job=exc.job_id, path=request.path, reason=str(exc))
        request.app[ENGINE].lose(exc.job_id, str(exc))
        response = error(503, "writer_changed", "this job's writer changed while the request ran; retry")
        response.headers["Retry-After"] = "1"
        return response
    except BlobStoreError as exc:
        log.error("blob_store_failed", path=request.path, error=str(exc)[:500])
        response = error(503, "storage_unavailable", f"the blob store failed: {str(exc)[:300]}; retry later")
        response.headers["Retry-After"] = "5"
        return response


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [{"field": field or "(job)", "message": msg} for field, msg in field_errors(exc)]


def one_line(errors: list[dict[str, str]]) -> str:
    """The errors as the one-line detail of an error answer or a rejection."""
    return "; ".join(f"{e['field']}: {e['message']}" for e in errors)


def forwarded(request: web.Request, header: str) -> str | None:
    """The caller another aggregator replica forwarded this request for (`aggregator.forward`): believed only
    from a peer whose own certificate is an aggregator's, never from a site's or an operator's."""
    cert = certificate_identity(request)
    value = request.headers.get(header)
    return value if value is not None and cert is not None and cert.role == "aggregator" else None


def authorize(request: web.Request, role: str) -> Identity | Rejection:
    """Sites are identified only by their TLS client certificate, never by headers or bodies (the one exception:
    the site named by another aggregator replica that forwarded its request, see `forwarded`)."""
    site = forwarded(request, FORWARDED_SITE)
    if site is not None and role == "site":
        return Identity(site, "site") if SITE_NAME.fullmatch(site) else Rejection(
            "no_identity", "a forwarded request named no valid site", 401)
    who = certificate_identity(request)
    if who is None:
        return Rejection("no_identity", "a client certificate issued by the federation CA is required", 401)
    if who.role != role:
        return Rejection("wrong_role", f"{who.name!r} is a {who.role}; this endpoint is for a {role}", 403)
    return who


def operator(role: Role) -> Callable[[Handler], Handler]:
    """Operator endpoints: `viewer` may read, `admin` may also change jobs."""

    def decorate(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            who: Identity | TokenRefusal | None = operator_identity(request, request.app[TOKENS])
            named = forwarded(request, FORWARDED_OPERATOR)
            if named is not None and len(parts := named.split(" ")) == 2 and parts[1] in ("viewer", "admin"):
                who = Identity(parts[0], parts[1])
            if isinstance(who, TokenRefusal):
                if (count := request.app.get(TOKEN_REFUSED)) is not None:
                    count(who.reason)
                request.app[REJECTIONS].log.warning("token_refused", ("token", who.reason), reason=who.reason,
                                                    detail=who.detail, path=request.path)
                return error(401, who.reason, who.detail)
            if who is None:
                cert = certificate_identity(request)
                if cert is not None:
                    return error(403, "wrong_role", f"{cert.name!r} is a {cert.role}; operators only")
                return error(401, "no_identity", "an operator certificate or bearer token is required")
            if role == "admin" and who.role != "admin":
                return error(403, "wrong_role", f"{who.name!r} is a {who.role}; this needs an admin")
            request[OPERATOR] = who
            return await handler(request)

        return wrapped

    return decorate


class RejectionLog:
    """Every refused request is counted in /metrics and logged (a line per site and reason at most every 30 s, its
    detail truncated). It becomes a stored row, shown on the job's page and in its report, only for a site invited
    to the job, and at most `rows_per_round` times per job, round and site: an unauthenticated caller, or
    one naming a job it is not in, must not write a row per request."""

    def __init__(self, rows_per_round: int = 20, detail_chars: int = 500, max_keys: int = 100_000) -> None:
        self._rows_per_round, self.detail_chars, self._max_keys = rows_per_round, detail_chars, max_keys
        self._rows: OrderedDict[tuple[str, int | None, str], int] = OrderedDict()
        self.log = RateLimitedLog()

    def should_store(self, job_id: str, rnd: int | None, site: str) -> bool:
        key = (job_id, rnd, site)
        n = self._rows.get(key, 0)
        self._rows[key] = n + 1
        self._rows.move_to_end(key)
        if len(self._rows) > self._max_keys:
            self._rows.popitem(last=False)
        return n < self._rows_per_round


REJECTIONS: web.AppKey[RejectionLog] = web.AppKey("rejections", RejectionLog)


async def reject(
    request: web.Request, r: Rejection, site: str | None, job_id: str | None, rnd: int | None
) -> web.Response:
    app, rejections = request.app, request.app[REJECTIONS]
    detail = r.detail[: rejections.detail_chars]
    app[METRICS].updates_rejected.labels(site or "unknown", r.reason).inc()
    rejections.log.warning("upload_rejected", (site or "unknown", r.reason), site=site, reason=r.reason,
                           detail=detail, job=job_id, round=rnd)
    if site is not None and job_id is not None and (
            app[ENGINE].invited(job_id, site) or await app[DB].read(lambda s: s.invited(job_id, site))) \
            and rejections.should_store(job_id, rnd, site):
        await app[DB](app[DB].store.add_rejection, job_id, rnd, site, r.reason, detail, time.time())
    return error(r.status, r.reason, detail)


async def at_writer(request: web.Request, job_id: str, caller: tuple[str, str]) -> web.Response | None:
    """When another replica writes `job_id`, the request forwarded there and its answer; None to handle it here
    (this replica writes the job, or the job has no writer: then the engine says why it cannot be done)."""
    app = request.app
    if app[ENGINE].runs(job_id) or FORWARDED_SITE in request.headers or FORWARDED_OPERATOR in request.headers:
        return None  # a forwarded request is never forwarded again
    lease = await app[DB].read(lambda s: s.lease(job_id))
    if lease is None or lease.holder == app[LEASE].holder:
        return None
    return await app[FORWARDER].to_writer(request, lease, await read_body(request), caller)


async def read_body(request: web.Request) -> bytes:
    """The request body, within the configured time: a client trickling bytes is cut off (408)."""
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=_strict_dumps({"error": "body_timeout", "detail": "the body took longer "
                                     f"than {request.app[BODY_TIMEOUT]:g} s to arrive"}),
                                     content_type="application/json") from None


# ---------------------------------------------------------------- operations
@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text (docs/metrics.md); not here when `metrics_port` moves it to an internal listener."""
    if request.app.get(METRICS_ELSEWHERE):
        return error(404, "not_here", "metrics are served on the aggregator's internal metrics listener")
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


def metrics_app(registry_of: AggregatorMetrics) -> web.Application:
    """/metrics alone, for an internal listener (plain HTTP, e.g. a pod port only the cluster's Prometheus reaches)."""
    app = web.Application()
    app[METRICS] = registry_of
    app.router.add_get("/metrics", metrics)
    return app
