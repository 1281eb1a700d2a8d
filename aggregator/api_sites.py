"""The sites' endpoints: download a global model, upload an update or an evaluation. The caller is the site its
client certificate names, never a field of the body; every refusal goes through `aggregator.api.reject`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from pydantic import ValidationError

from aggregator.api import (
    BLOBS,
    CLOSE_AFTER_BYTES,
    DB,
    ENGINE,
    MAX_UPLOAD,
    METRICS,
    Handler,
    at_writer,
    authorize,
    error,
    json_response,
    one_line,
    read_body,
    reject,
    validation_errors,
)
from aggregator.validation import Rejection
from federation.bounds import MAX_ROUND
from federation.messages import ENVELOPE_HEADER, EvaluationReport, UpdateEnvelope

routes = web.RouteTableDef()


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
            elsewhere = await at_writer(request, job_id, ("site", who.name))
            return elsewhere if elsewhere is not None else await handler(request, who.name, job_id, rnd)

    return wrapped


def malformed(reason: str, exc: ValidationError) -> Rejection:
    return Rejection(reason, one_line(validation_errors(exc)))


@routes.post("/api/v1/jobs/{job_id}/rounds/{round}/update")
@site_call
async def upload_update(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    app = request.app
    # The job's layout bounds its updates: a body announced larger is refused before a byte of it is read (and the
    # connection closed, so the rest is never read either).
    limit = min(app[MAX_UPLOAD], app[ENGINE].update_limit(job_id) or app[MAX_UPLOAD])
    if request.content_length is not None and request.content_length > limit:
        r = Rejection("too_large", f"a body of {request.content_length} bytes; this job's updates take at most "
                                   f"{limit}", 413)
        response = await reject(request, r, site, job_id, rnd)
        response.force_close()
        return response
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


class SiteBody(Protocol):
    site: str
    job_id: str
    round: int


B = TypeVar("B", bound=SiteBody)


async def json_post(request: web.Request, site: str, job_id: str, rnd: int, model: type[B], what: str,
                    receive: Callable[[str, B], Awaitable[dict[str, Any]]]) -> web.Response:
    """A site's JSON message: parsed as hostile, its site/job/round the caller's and the URL's, then handed to the
    engine; every refusal explained through `reject`."""
    try:
        body = model.model_validate_json(await read_body(request))  # type: ignore[attr-defined]
    except ValidationError as exc:
        return await reject(request, malformed(f"malformed_{what}", exc), site, job_id, rnd)
    if body.site != site or (body.job_id, body.round) != (job_id, rnd):
        r = Rejection("identity_mismatch", f"the {what}'s site/job/round differ from the caller's", 403)
        return await reject(request, r, site, job_id, rnd)
    try:
        return json_response(await receive(site, body))
    except Rejection as r:
        return await reject(request, r, site, job_id, rnd)


@routes.post("/api/v1/jobs/{job_id}/rounds/{round}/evaluation")
@site_call
async def upload_evaluation(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    return await json_post(request, site, job_id, rnd, EvaluationReport, "evaluation",
                           request.app[ENGINE].receive_evaluation)


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


