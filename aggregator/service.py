"""Wires the aggregator together: store, blobs, MQTT link, round engine, HTTP API."""

from __future__ import annotations

import asyncio
import os

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from aggregator import api, api_operators, api_secagg, api_sites
from aggregator.auth import OperatorTokens
from aggregator.blobs import open_blobs
from aggregator.config import AggregatorConfig
from aggregator.console import add_console
from aggregator.db import Db
from aggregator.engine import RoundEngine
from aggregator.forward import Forwarder
from aggregator.ingress import IngressLimiter, SiteInbox
from aggregator.jobevents import JobEventWorker
from aggregator.leases import LeaseKeeper, LeaseSettings
from aggregator.metrics import AggregatorMetrics
from aggregator.revocation import IdentityMetrics, RevocationList, refuse_revoked
from aggregator.sites import SiteRegistry
from aggregator.store import open_store
from aggregator.tracking import TrackingHub
from federation import topics
from federation.mqtt import MqttLink
from federation.signing import load_private_key, sign

log = structlog.get_logger(__name__)


def create_app(cfg: AggregatorConfig) -> web.Application:
    if cfg.tls is None or cfg.tls.cert_file is None or cfg.signing_key is None:
        raise ValueError("the aggregator needs `tls` (CA, certificate, key) and `signing_key`: sites trust only "
                         "signed jobs and identify themselves with client certificates (see `fedsilo certs`)")
    key = load_private_key(cfg.signing_key)
    db = Db(open_store(cfg.state_url), reader=open_store(cfg.state_url))
    blobs = open_blobs(cfg.blob_url, cfg.blob_s3)
    metrics = AggregatorMetrics()
    sites = SiteRegistry(db, metrics)
    background: list[asyncio.Task[None]] = []  # long-running loops, cancelled at shutdown

    broker = cfg.broker if cfg.broker.tls is not None else cfg.broker.model_copy(update={"tls": cfg.tls})
    inbox = SiteInbox(IngressLimiter(cfg.mqtt_max_message_bytes, cfg.mqtt_site_rate_per_s, cfg.mqtt_site_burst),
                      sites, lambda event: engine.on_site_event(event), metrics)
    # One MQTT session per replica (a shared client id would have the broker drop one replica for the other).
    link = MqttLink(f"fedsilo-aggregator-{cfg.replica_id}", broker, inbox,
                    subscriptions=[topics.status(), topics.events()])
    lease = LeaseSettings(cfg.replica_id, cfg.advertise_url or f"https://{cfg.host}:{cfg.port}", cfg.lease_ttl_s)

    tracking = TrackingHub(cfg.tracking, metrics.registry, cfg.report_dir, cfg.state_url)
    # Reports and tracking follow rounds and jobs on a worker of their own, with a store connection of its own.
    events = JobEventWorker(db, lambda: open_store(cfg.state_url), blobs, cfg.report_dir, tracking, metrics,
                            lease=lease)
    engine = RoundEngine(db, blobs, link, lambda m: sign(m, key), metrics, post=events.post, lease=lease)
    keeper = LeaseKeeper(db, engine, lease, events)
    forwarder = Forwarder(cfg.tls)
    # Revoked certificates and the operators' tokens are read now, so a bad file stops the start with its reason,
    # and again whenever they change (aggregator/revocation.py, aggregator/auth.py).
    identity = IdentityMetrics(metrics.registry, with_crl=cfg.crl_file is not None)
    tokens = OperatorTokens(cfg.operators, cfg.operators_file,
                            on_reload_failure=identity.reload_failures.labels("operators").inc)
    tokens.check()
    middlewares: list[Middleware] = [api.storage_errors]
    if cfg.crl_file is not None:
        crl = RevocationList(cfg.crl_file, cfg.tls.ca_file, identity)
        crl.load()
        middlewares.insert(0, refuse_revoked(crl, identity))
    app = web.Application(client_max_size=cfg.max_upload_bytes, middlewares=middlewares)
    app[api.ENGINE], app[api.DB], app[api.BLOBS], app[api.METRICS] = engine, db, blobs, metrics
    app[api.MAX_UPLOAD] = cfg.max_upload_bytes
    app[api.BODY_TIMEOUT] = cfg.http_body_timeout_s
    app[api.MAX_PARAMS] = cfg.max_model_parameters
    app[api.MAX_PUBLISH] = cfg.mqtt_max_publish_bytes
    app[api.METRICS_ELSEWHERE] = cfg.metrics_port is not None
    internal: list[web.AppRunner] = []
    app[api.REJECTIONS] = api.RejectionLog()
    app[api.TOKENS] = tokens
    app[api.TOKEN_REFUSED] = lambda reason: identity.tokens_refused.labels(reason).inc()
    app[api.LEASE], app[api.FORWARDER] = lease, forwarder
    for table in (api.routes, api_operators.routes, api_sites.routes, api_secagg.routes):
        app.add_routes(table)
    add_console(app)  # static files only; the page reads everything through the API above

    async def startup(_: web.Application) -> None:
        await link.start()
        await sites.load()
        await events.start()  # first takes up the follow-ups of jobs that ended before the last stop
        await engine.recover()
        await keeper.step()  # the jobs no live replica writes (all of them for a lone replica) are resumed here
        background.append(asyncio.create_task(keeper.run()))
        await tracking.start()  # drains records a previous run left in the outbox
        background.append(asyncio.create_task(sites.run(cfg.site_timeout_s)))
        if cfg.metrics_port is not None:
            runner = web.AppRunner(api.metrics_app(metrics), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, cfg.metrics_host, cfg.metrics_port).start()
            internal.append(runner)
        log.info("aggregator_started", host=cfg.host, port=cfg.port, tls=cfg.tls is not None)

    async def cleanup(_: web.Application) -> None:
        for task in background:
            task.cancel()
        for runner in internal:
            await runner.cleanup()
        await engine.shutdown()
        await forwarder.close()
        await sites.flush()
        await events.close(min(1.0, cfg.tracking.close_timeout_s))  # what is left is done at the next start
        await tracking.close()
        await link.stop()
        db.shutdown()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app


def serve(cfg: AggregatorConfig) -> None:
    # State, blobs, reports and the tracking outbox hold what sites sent: readable by this service's user only.
    os.umask(0o077)
    app = create_app(cfg)
    assert cfg.tls is not None
    # Certificates are optional at the handshake (health probes and Prometheus need none) but verified when
    # presented; every site and operator endpoint then requires one (`api.authorize`).
    ssl_ctx = cfg.tls.server_context(require_client_cert=False)
    # On SIGTERM aiohttp waits up to `shutdown_timeout` (60 s by default) for requests in flight, e.g. an upload a
    # site is still sending; such an update is not acknowledged yet, so the site resends it after the restart.
    web.run_app(app, host=cfg.host, port=cfg.port, ssl_context=ssl_ctx, print=None, access_log=None,
                keepalive_timeout=cfg.http_keepalive_s, shutdown_timeout=cfg.shutdown_grace_s,
                handle_signals=True)
    log.info("aggregator_stopped")
