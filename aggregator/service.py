"""Wires the aggregator together: store, blobs, MQTT link, round engine, HTTP API."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from pydantic import ValidationError

from aggregator import api
from aggregator.blobs import open_blobs
from aggregator.config import AggregatorConfig
from aggregator.console import add_console
from aggregator.engine import RoundEngine
from aggregator.metrics import AggregatorMetrics
from aggregator.report import job_summary, write_report
from aggregator.store import open_store
from aggregator.tracking import TrackingHub
from federation import topics
from federation.messages import SiteEvent, SiteStatus
from federation.mqtt import MqttLink
from federation.signing import load_private_key, sign

log = structlog.get_logger(__name__)


def create_app(cfg: AggregatorConfig) -> web.Application:
    if cfg.tls is None or cfg.tls.cert_file is None or cfg.signing_key is None:
        raise ValueError("the aggregator needs `tls` (CA, certificate, key) and `signing_key`: sites trust only "
                         "signed jobs and identify themselves with client certificates (see `fedsilo certs`)")
    key = load_private_key(cfg.signing_key)
    store = open_store(cfg.state_url)
    blobs = open_blobs(cfg.blob_url)
    metrics = AggregatorMetrics()
    pending: set[asyncio.Task[None]] = set()
    background: list[asyncio.Task[None]] = []  # long-running loops, cancelled at shutdown

    def on_message(topic: str, payload: bytes) -> None:
        site = topics.site_of(topic)
        try:
            if topic.endswith("/status"):
                if not payload:
                    return
                msg: SiteStatus | SiteEvent = SiteStatus.model_validate_json(payload)
            else:
                msg = SiteEvent.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("mqtt_message_rejected", topic=topic, reason="malformed", detail=str(exc)[:300])
            metrics.updates_rejected.labels(site or "unknown", "malformed_message").inc()
            return
        if msg.site != site:  # the broker's ACL ties a topic to one site; the payload must agree
            log.warning("mqtt_message_rejected", topic=topic, reason="site_mismatch", claimed=msg.site)
            metrics.updates_rejected.labels(site or "unknown", "site_mismatch").inc()
            return
        coro = engine.on_site_status(msg) if isinstance(msg, SiteStatus) else engine.on_site_event(msg)
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    broker = cfg.broker if cfg.broker.tls is not None else cfg.broker.model_copy(update={"tls": cfg.tls})
    link = MqttLink("fedsilo-aggregator", broker, on_message, subscriptions=[topics.status(), topics.events()])

    tracking = TrackingHub(cfg.tracking, metrics.registry, cfg.report_dir, cfg.state_url)

    async def on_job_event(job_id: str, event: str) -> None:
        if event in ("finished", "failed", "cancelled"):
            out = await engine.db(write_report, store, blobs, job_id, cfg.report_dir)
            log.info("report_written", job=job_id, path=str(out))
        summary = await engine.db(job_summary, store, job_id)
        if summary is not None:
            await tracking.on_job_event(event, summary)

    engine = RoundEngine(store, blobs, link, lambda m: sign(m, key), metrics, on_job_event=on_job_event)
    app = web.Application(client_max_size=cfg.max_upload_bytes)
    app[api.ENGINE], app[api.STORE], app[api.BLOBS], app[api.METRICS] = engine, store, blobs, metrics
    app[api.MAX_UPLOAD] = cfg.max_upload_bytes
    app[api.TOKENS] = cfg.operators
    app.add_routes(api.routes)
    add_console(app)  # static files only; the page reads everything through the API above

    async def startup(_: web.Application) -> None:
        await link.start()
        await engine.recover()
        await tracking.start()  # drains records a previous run left in the outbox
        background.append(asyncio.create_task(engine.run_site_sweeper(cfg.site_timeout_s)))
        log.info("aggregator_started", host=cfg.host, port=cfg.port, tls=cfg.tls is not None)

    async def cleanup(_: web.Application) -> None:
        for task in background:
            task.cancel()
        await tracking.close()
        await engine.shutdown()
        await link.stop()
        store.close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app


def serve(cfg: AggregatorConfig) -> None:
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
