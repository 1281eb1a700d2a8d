"""The operators' endpoints: submit and follow jobs, act on them (admin), read sites, rejections, decisions and the
quarantine. Every call needs an operator certificate or bearer token (`aggregator.api.operator`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from aggregator.api import (
    BLOBS,
    DB,
    ENGINE,
    MAX_PARAMS,
    MAX_PUBLISH,
    OPERATOR,
    at_writer,
    error,
    json_response,
    one_line,
    operator,
    read_body,
    validation_errors,
)
from aggregator.auth import Identity
from aggregator.store import JobRow, StateStore
from aggregator.summary import job_summary
from federation.jobs import JobSpec
from federation.models import count_parameters
from federation.yamlfile import ConfigFileError, load_yaml

routes = web.RouteTableDef()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigFileError(f"the job gives the key {dup!r} twice")
    return dict(pairs)


@routes.post("/api/v1/jobs")
@operator("admin")
async def submit_job(request: web.Request) -> web.Response:
    try:
        text = (await read_body(request)).decode("utf-8")
    except UnicodeDecodeError as exc:
        return error(400, "unparseable_job", f"the body is not UTF-8 text: {exc}")
    try:
        # A key given twice is refused (YAML and JSON parsers would keep the last one silently).
        data = json.loads(text, object_pairs_hook=_unique_keys) if request.content_type == "application/json" \
            else load_yaml(text, "the job")
    except (json.JSONDecodeError, ConfigFileError) as exc:
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
    size = request.app[ENGINE].offer_bytes(spec, request[OPERATOR].name)
    if size > request.app[MAX_PUBLISH]:  # the broker would drop it without telling anyone: the job would hang
        return error(400, "offer_too_large", f"the signed job offer is {size:,} bytes; the broker takes at most "
                                             f"{request.app[MAX_PUBLISH]:,} (mqtt_max_publish_bytes)")
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
    who: Identity = request[OPERATOR]
    elsewhere = await at_writer(request, job_id, ("operator", f"{who.name} {who.role}"))
    if elsewhere is not None:
        return elsewhere
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


@routes.get("/api/v1/sites/{site}/audit-head")
@operator("viewer")
async def audit_head(request: web.Request) -> web.Response:
    """The latest head of the site's audit chain the aggregator received (`aggregator.store.audit_heads`): give its
    sha256 to `fedsilo audit verify --aggregator-head` at the site to detect a rewritten local chain."""
    site = request.match_info["site"]
    row = await request.app[DB].read(lambda s: s.audit_head(site))
    if row is None:
        return error(404, "unknown_site", "no audit head was received from this site")
    return json_response(row)


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


