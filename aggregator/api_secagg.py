"""The sites' secure-aggregation endpoints (`federation.secagg.messages`): post shares (and, if asked, wait for the
round's roster in the same exchange), wait for the roster, wait for the unmask request with the shares addressed to
the caller, post a reveal. As for every site endpoint, the caller is the site its certificate names and every
refusal goes through `aggregator.api.reject`."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from aggregator.api import ENGINE, error, json_response, reject
from aggregator.api_sites import json_post, site_call
from aggregator.validation import Rejection
from federation.secagg.messages import MAX_WAIT_S, Reveal, ShareBundle

routes = web.RouteTableDef()
log = structlog.get_logger(__name__)


class _RevealNotNeeded(Exception):
    """A reveal for a round that closed already: the first `threshold` reveals unmasked it (or it failed)."""


def _wait(request: web.Request) -> float:
    try:
        return min(max(float(request.query.get("wait", "0")), 0.0), MAX_WAIT_S)
    except ValueError:
        return 0.0


def _pending() -> web.Response:
    return json_response({"status": "pending"}, status=202)


@routes.post("/api/v1/jobs/{job_id}/rounds/{round}/secagg/shares")
@site_call
async def post_shares(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    """With `?wait=s` the answer, once the shares are stored, waits up to s seconds for the round's roster and
    carries it (`roster`: the signed roster as GET …/roster serves it): one exchange where a site needs two."""
    engine, wait = request.app[ENGINE], _wait(request)

    async def receive(caller: str, bundle: ShareBundle) -> dict[str, object]:
        ack = await engine.receive_shares(caller, bundle)
        if wait > 0:
            try:
                signed = await engine.secure_roster(caller, job_id, rnd, wait)
            except Rejection:  # the round moved on while this waited: the shares are stored, the ack stands
                signed = None
            if signed is not None:
                ack["roster"] = signed.decode()
        return ack

    return await json_post(request, site, job_id, rnd, ShareBundle, "shares", receive)


@routes.get("/api/v1/jobs/{job_id}/rounds/{round}/secagg/roster")
@site_call
async def get_roster(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    try:
        signed = await request.app[ENGINE].secure_roster(site, job_id, rnd, _wait(request))
    except Rejection as r:
        return await reject(request, r, site, job_id, rnd)
    return _pending() if signed is None else web.Response(body=signed, content_type="application/json")


@routes.get("/api/v1/jobs/{job_id}/rounds/{round}/secagg/unmask")
@site_call
async def get_unmask(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    try:
        work = await request.app[ENGINE].secure_unmask(site, job_id, rnd, _wait(request))
    except Rejection as r:
        return await reject(request, r, site, job_id, rnd)
    return _pending() if work is None else web.Response(body=work.model_dump_json(), content_type="application/json")


@routes.post("/api/v1/jobs/{job_id}/rounds/{round}/secagg/reveal")
@site_call
async def post_reveal(request: web.Request, site: str, job_id: str, rnd: int) -> web.Response:
    """A reveal after its round closed is answered 409 `late_update` (the site stops there) but is not recorded
    as a rejection: when more than `threshold` sites survive, the last reveals arrive after the first ones unmasked
    the round, in every such round, and nothing in them is wrong. It reveals nothing either: a late reveal is not
    read."""
    engine = request.app[ENGINE]

    async def receive(caller: str, reveal: Reveal) -> dict[str, Any]:
        try:
            ack: dict[str, Any] = await engine.receive_reveal(caller, reveal)
        except Rejection as r:
            if r.reason == "late_update":
                raise _RevealNotNeeded(r.detail) from None
            raise
        return ack

    try:
        return await json_post(request, site, job_id, rnd, Reveal, "reveal", receive)
    except _RevealNotNeeded as exc:
        log.info("secagg_reveal_not_needed", detail=str(exc))
        return error(409, "late_update", str(exc))
