"""The aggregator's HTTP API (aiohttp): job submission and status for operators, model download and
update/evaluation upload for agents, `/metrics` for Prometheus.

Every refused upload is answered with a reason code and a sentence, counted, logged and stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from aggregator import openapi
from aggregator.auth import Identity, OperatorToken, Role, certificate_identity, operator_identity
from aggregator.blobs import BlobStore, BlobStoreError
from aggregator.db import Db
from aggregator.engine import RoundEngine
from aggregator.ingress import RateLimitedLog
from aggregator.metrics import AggregatorMetrics
from aggregator.store import JobRow, StateStore
from aggregator.store.sql import UnreadableRow
from aggregator.summary import job_summary
from aggregator.validation import Rejection
from federation.jobs import JobSpec
from federation.messages import ENVELOPE_HEADER, EvaluationReport, UpdateEnvelope
from federation.models import count_parameters
from federation.schema import field_errors

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINE: web.AppKey[RoundEngine] = web.AppKey("engine", RoundEngine)
DB: web.AppKey[Db] = web.AppKey("db", Db)
BLOBS: web.AppKey[BlobStore] = web.AppKey("blobs", BlobStore)
METRICS: web.AppKey[AggregatorMetrics] = web.AppKey("metrics", AggregatorMetrics)
MAX_UPLOAD: web.AppKey[int] = web.AppKey("max_upload", int)
TOKENS: web.AppKey[tuple[OperatorToken, ...]] = web.AppKey("tokens", tuple)
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)
MAX_PARAMS: web.AppKey[int] = web.AppKey("max_params", int)
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


def authorize(request: web.Request, role: str) -> Identity | Rejection:
    """Sites are identified only by their TLS client certificate, never by headers or bodies."""
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
            who = operator_identity(request, request.app[TOKENS])
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
    to a running job, and at most `rows_per_round` times per job, round and site: an unauthenticated caller, or
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
    if site is not None and job_id is not None and app[ENGINE].invited(job_id, site) \
            and rejections.should_store(job_id, rnd, site):
        await app[DB](app[DB].store.add_rejection, job_id, rnd, site, r.reason, detail, time.time())
    return error(r.status, r.reason, detail)


async def read_body(request: web.Request) -> bytes:
    """The request body, within the configured time: a client trickling bytes is cut off (408)."""
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=_strict_dumps({"error": "body_timeout", "detail": "the body took longer "
                                     f"than {request.app[BODY_TIMEOUT]:g} s to arrive"}),
                                     content_type="application/json") from None


# ---------------------------------------------------------------- operators
@routes.post("/api/v1/jobs")
@operator("admin")
async def submit_job(request: web.Request) -> web.Response:
    try:
        text = (await read_body(request)).decode("utf-8")
    except UnicodeDecodeError as exc:
        return error(400, "unparseable_job", f"the body is not UTF-8 text: {exc}")
    try:
        data = json.loads(text) if request.content_type == "application/json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        return error(400, "unparseable_job", f"the body is not valid JSON/YAML: {exc}")
    except RecursionError:
        return error(400, "unparseable_job", "the body is nested too deeply to be a job")
    if not isinstance(data, dict):
        return error(400, "invalid_job", "a job must be a mapping", errors=[])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = validation_errors(exc)
        return error(400, "invalid_job", one_line(errors), errors=errors)
    n = count_parameters(spec.model.name, spec.features.input_dim(), spec.model.hidden)
    if n > request.app[MAX_PARAMS]:
        return error(400, "model_too_large", f"the model has {n:,} parameters; this aggregator takes at most "
                                             f"{request.app[MAX_PARAMS]:,} (max_model_parameters)")
    job_id = await request.app[ENGINE].submit(spec, requester=request[OPERATOR].name)
    return json_response({"job_id": job_id, "state": "offered"}, status=201)


@routes.get("/api/v1/jobs")
@operator("viewer")
async def list_jobs(request: web.Request) -> web.Response:
    app = request.app
    jobs = await app[DB].read(lambda s: s.list_jobs(None))
    deadlines = await app[DB].read(_open_deadlines, [j for j in jobs if j.state == "running"])
    return json_response([
        {"job_id": j.job_id, "name": j.spec.name, "state": j.state, "round": min(j.round, j.spec.rounds),
         "rounds": j.spec.rounds, "reason": j.reason, "created_at": j.created_at,
         "updated_at": j.updated_at, "paused": j.paused, "min_sites": j.spec.min_sites, "quorum": j.spec.quorum,
         "sites": list(j.spec.sites), "round_deadline_s": j.spec.round_deadline_s,
         "deadline": deadlines.get(j.job_id)}
        for j in jobs
    ])


def _open_deadlines(store: StateStore, jobs: list[JobRow]) -> dict[str, float]:
    """The deadline of each running job's open round (none between rounds, e.g. while a job is paused)."""
    out: dict[str, float] = {}
    for j in jobs:
        rnd = store.get_round(j.job_id, j.round)
        if rnd is not None and rnd.state == "open":
            out[j.job_id] = rnd.deadline
    return out


@routes.get("/api/v1/jobs/{job_id}")
@operator("viewer")
async def get_job(request: web.Request) -> web.Response:
    """The job's summary; `?sites=none` leaves the per-site detail out (a status poll of a large federation)."""
    detail = request.query.get("sites", "all")
    if detail not in ("all", "none"):
        return error(400, "bad_query", f"sites must be 'all' or 'none', not {detail[:40]!r}")
    per_site = detail == "all"
    summary = await request.app[DB].read(job_summary, request.match_info["job_id"], per_site)
    if summary is None:
        return error(404, "unknown_job", f"no job {request.match_info['job_id']!r}")
    return json_response(summary)


async def _job_action(request: web.Request, action: Callable[[str], Awaitable[None]],
                      result: dict[str, object]) -> web.Response:
    """Run an operator action on a running job: the engine raises KeyError when the job is not running."""
    job_id = request.match_info["job_id"]
    try:
        await action(job_id)
    except KeyError:
        return error(409, "job_not_running", "no running job with that id")
    return json_response({"job_id": job_id, **result})


@routes.post("/api/v1/jobs/{job_id}/cancel")
@operator("admin")
async def cancel_job(request: web.Request) -> web.Response:
    return await _job_action(request, request.app[ENGINE].cancel, {"state": "cancelled"})


@routes.post("/api/v1/jobs/{job_id}/pause")
@operator("admin")
async def pause_job(request: web.Request) -> web.Response:
    return await _job_action(request, request.app[ENGINE].pause, {"paused": True})


@routes.post("/api/v1/jobs/{job_id}/resume")
@operator("admin")
async def resume_job(request: web.Request) -> web.Response:
    return await _job_action(request, request.app[ENGINE].resume, {"paused": False})


@routes.get("/api/v1/jobs/{job_id}/model")
@operator("viewer")
async def final_model(request: web.Request) -> web.Response:
    app = request.app
    job = await app[DB].read(lambda s: s.get_job(request.match_info["job_id"]))
    if job is None:
        return error(404, "unknown_job", "no such job")
    body = await app[DB].read(lambda _: app[BLOBS].get(job.model_sha))
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={"X-Fedsilo-Sha256": job.model_sha})


@routes.get("/api/v1/sites")
@operator("viewer")
async def sites(request: web.Request) -> web.Response:
    return json_response(await request.app[DB].read(lambda s: s.sites()))


@routes.get("/api/v1/rejections")
@operator("viewer")
async def rejections(request: web.Request) -> web.Response:
    return json_response(await request.app[DB].read(lambda s: s.rejections(request.query.get("job_id"), 1000)))


@routes.get("/api/v1/quarantine")
@operator("viewer")
async def quarantine(request: web.Request) -> web.Response:
    """Stored rows that failed their checks at start-up and were moved aside (their jobs failed with the reason)."""
    return json_response(await request.app[DB].read(lambda s: s.quarantined(1000)))


@routes.get("/api/v1/decisions")
@operator("viewer")
async def decisions(request: web.Request) -> web.Response:
    """Every site's answer to every job offered to it (reasons, ε spent in that job): the console's site view."""
    return json_response(await request.app[DB].read(lambda s: s.site_decisions(request.query.get("site"))))


@routes.get("/api/v1/me")
@operator("viewer")
async def whoami(request: web.Request) -> web.Response:
    """Who the caller is authenticated as, so a client can offer only what its role allows."""
    who: Identity = request[OPERATOR]
    return json_response({"name": who.name, "role": who.role})


# ---------------------------------------------------------------- agents
@routes.get("/api/v1/blobs/{sha}")
async def get_blob(request: web.Request) -> web.Response:
    """Global models only, to sites only: no one reads a site's update."""
    app, sha = request.app, request.match_info["sha"]
    who = authorize(request, "site")
    if isinstance(who, Rejection):
        return error(who.status, who.reason, who.detail)
    if not await app[DB].read(lambda s: s.is_model(sha)):
        return error(404, "unknown_model", "no global model with that hash")
    body = await app[DB].read(lambda _: app[BLOBS].get(sha))
    app[METRICS].bytes_sent.inc(len(body))
    return web.Response(body=body, content_type="application/octet-stream")


SiteHandler = Callable[[web.Request, str, str, int], Awaitable[web.Response]]


def site_call(handler: SiteHandler) -> Handler:
    """Site endpoints: the caller is the site its client certificate names (never a field of the body), and every
    log line of the call carries its job, round and site."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        who = authorize(request, "site")
        job_id, rnd = request.match_info["job_id"], _int(request.match_info["round"])
        if isinstance(who, Rejection):
            return await reject(request, who, None, job_id, rnd)
        with structlog.contextvars.bound_contextvars(job=job_id, round=rnd, site=who.name):
            return await handler(request, who.name, job_id, rnd)

    return wrapped


def malformed(reason: str, exc: ValidationError) -> Rejection:
    return Rejection(reason, one_line(validation_errors(exc)))


@routes.post("/api/v1/jobs/{job_id}/rounds/{round}/update")
@site_call
async def upload_update(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    app = request.app
    if request.content_length is not None and request.content_length > app[MAX_UPLOAD]:
        r = Rejection("too_large", f"body over {app[MAX_UPLOAD]} bytes", 413)
        return await reject(request, r, site, job_id, rnd)
    try:
        env = UpdateEnvelope.model_validate_json(request.headers.get(ENVELOPE_HEADER, ""))
    except ValidationError as exc:
        return await reject(request, malformed("malformed_envelope", exc), site, job_id, rnd)
    if env.site != site:
        r = Rejection("identity_mismatch", f"authenticated as {site!r} but the envelope says {env.site!r}", 403)
        return await reject(request, r, site, job_id, rnd)
    if (env.job_id, env.round) != (job_id, rnd):
        r = Rejection("envelope_mismatch", "the envelope's job/round differ from the URL's")
        return await reject(request, r, site, job_id, rnd)
    body = await read_body(request)
    app[METRICS].bytes_received.inc(len(body))
    try:
        ack = await app[ENGINE].receive_update(site, env, body)
    except Rejection as r:
        return await reject(request, r, site, job_id, rnd)
    response = json_response(ack)
    if len(body) > CLOSE_AFTER_BYTES:
        response.force_close()
    return response


@routes.post("/api/v1/jobs/{job_id}/rounds/{round}/evaluation")
@site_call
async def upload_evaluation(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    try:
        report = EvaluationReport.model_validate_json(await read_body(request))
    except ValidationError as exc:
        return await reject(request, malformed("malformed_evaluation", exc), site, job_id, rnd)
    if report.site != site or (report.job_id, report.round) != (job_id, rnd):
        r = Rejection("identity_mismatch", "the report's site/job/round differ from the caller's", 403)
        return await reject(request, r, site, job_id, rnd)
    try:
        return json_response(await request.app[ENGINE].receive_evaluation(site, report))
    except Rejection as r:
        return await reject(request, r, site, job_id, rnd)


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


MAX_ROUND = 1_000_000  # far beyond any job (JobSpec.rounds ≤ 10,000), well inside every store's integer column


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_ROUND:
        detail = f"round must be an integer from 0 to {MAX_ROUND}"
        raise web.HTTPBadRequest(text=json.dumps({"error": "bad_round", "detail": detail}),
                                 content_type="application/json")
    return value


def metrics_app(registry_of: AggregatorMetrics) -> web.Application:
    """/metrics alone, for an internal listener (plain HTTP, e.g. a pod port only the cluster's Prometheus reaches)."""
    app = web.Application()
    app[METRICS] = registry_of
    app.router.add_get("/metrics", metrics)
    return app
