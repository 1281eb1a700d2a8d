"""The per-hospital agent daemon: verify → policy → data → train → privatize → egress, and stay up.

Messages are handled one at a time by a single worker (a round's training blocks nothing but the next
message; heartbeats run beside it). Retained offers and tasks are re-delivered after any reconnect or
restart; the verifier drops exact re-deliveries and the release log makes handling a round again harmless.
Job acceptance lives in `agent.offers`, round execution in `agent.rounds`; what they share in `agent.site`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import structlog
import torch
from aiohttp import web

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.egress import EgressGate
from agent.offers import Offers
from agent.offsite import OffsiteText
from agent.policy import SitePolicy, endpoint_of
from agent.privacy import PrivacyEngine
from agent.rounds import Rounds
from agent.site import ActiveJob, Site, load_data
from agent.state import AgentState
from agent.status_server import AgentMetrics, status_app
from agent.verifier import MessageRefusedError, Verifier
from federation import topics
from federation.messages import JobOffer, SiteStatus, canonical_json
from federation.mqtt import MqttLink
from federation.signing import load_public_key
from federation.yamlfile import ConfigFileError

__all__ = ["ActiveJob", "Agent", "StartupError", "load_data", "run_agent"]
log = structlog.get_logger(__name__)
VERSION = "0.1.0"


class StartupError(Exception):
    """The agent cannot run safely with this configuration; the message says what to fix."""


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.site = cfg.site
        try:
            self.policy = SitePolicy.load(cfg.policy_file)
        except ConfigFileError as exc:
            raise StartupError(str(exc)) from None
        try:
            public_key = load_public_key(cfg.aggregator_public_key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load the aggregator's public key {cfg.aggregator_public_key}: {exc}") from None
        if self.policy.site != self.site:
            raise StartupError(f"policy {cfg.policy_file} is for site {self.policy.site!r}, not {self.site!r}")
        broker = cfg.broker if cfg.broker.tls is not None else cfg.broker.model_copy(update={"tls": cfg.tls})
        self.endpoints = [f"{broker.host}:{broker.port}", endpoint_of(str(cfg.aggregator_url))]
        blocked = [e for e in self.endpoints if e not in self.policy.egress.allowed_endpoints]
        if blocked:
            raise StartupError(f"configured endpoint(s) {blocked} are not on the egress allowlist of "
                               f"{cfg.policy_file}; the agent would have no allowed way to talk to the federation")
        state = AgentState(cfg.state_dir / "agent.db")
        audit = AuditLog(cfg.audit_log)
        self._verifier = Verifier(self.site, public_key, state)
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        offline = SiteStatus(site=self.site, state="offline", at=0.0, version=VERSION)
        self._link = MqttLink(
            f"fedsilo-agent-{self.site}", broker, self._on_message,
            subscriptions=[topics.offers(self.site), topics.tasks(self.site)],
            will=(topics.status(self.site), canonical_json(offline)), on_connect=self._publish_status,
            log_context={"site": self.site},
        )
        self.metrics = AgentMetrics()
        gate = EgressGate(self.site, str(cfg.aggregator_url), cfg.tls, self._link, self.policy.egress, audit,
                          on_refusal=lambda what: self.metrics.egress_refused.labels(what).inc(),
                          offsite=OffsiteText({n: ds.path for n, ds in self.policy.datasets.items()}))
        self._site = Site(cfg, self.policy, state, audit, gate, self.metrics, PrivacyEngine(state), self.endpoints)
        self._offers = Offers(self._site)
        self._rounds = Rounds(self._site, self._offers, self._verifier)
        for name in self.policy.privacy.budgets:
            self._site.update_budget_gauges(name)

    # ---------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(site=self.site)
        torch.set_num_threads(self.cfg.torch_threads)
        await self._site.gate.start()
        await self._link.start()
        runner: web.AppRunner | None = None
        if self.cfg.status_port is not None:
            # aiohttp waits up to `shutdown_timeout` (60 s by default) for requests in flight at shutdown; a
            # scrape that hangs must not hold up a SIGTERM.
            runner = web.AppRunner(status_app(self.metrics, self._link.connected.is_set), access_log=None,
                                   shutdown_timeout=self.cfg.shutdown_grace_s)
            await runner.setup()
            await web.TCPSite(runner, self.cfg.status_host, self.cfg.status_port).start()
        log.info("agent_started", broker=self.endpoints[0], aggregator=str(self.cfg.aggregator_url),
                 datasets=sorted(self.policy.datasets))
        workers = [asyncio.create_task(self._worker()), asyncio.create_task(self._heartbeat())]
        await stop.wait()
        for w in workers:
            w.cancel()
        # A round being trained in a worker thread is not waited for: it has released nothing yet (the ledger is
        # written on this thread once training returns), and its retained task brings it back after a restart.
        await asyncio.gather(*workers, return_exceptions=True)
        await self._rounds.secure.stop()  # unmask phases in flight: a restart resumes them from the round's task
        offline = SiteStatus(site=self.site, state="offline", at=time.time(), version=VERSION)
        await self._link.stop(final=(topics.status(self.site), canonical_json(offline)))
        await self._site.gate.close()
        if runner is not None:
            await runner.cleanup()
        self._site.state.close()
        log.info("agent_stopped")

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._queue.put_nowait((topic, payload))

    def _publish_status(self) -> None:
        self._site.gate.publish_status(
            SiteStatus(site=self.site, state="online", at=time.time(), active_jobs=sorted(self._site.jobs),
                       version=VERSION, **self._site.audit_head())
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            if self._link.connected.is_set():
                self._publish_status()

    async def _worker(self) -> None:
        while True:
            topic, payload = await self._queue.get()
            if not payload:
                continue  # a cleared retained message
            try:
                msg = self._verifier.check(topic, payload)
            except MessageRefusedError as exc:
                self.metrics.messages_refused.inc()
                log.warning("message_refused", job=exc.job_id, reason=exc.reason)
                self._site.log_audit("message_refused", job_id=exc.job_id, reason=exc.reason)
                if exc.job_id is not None:
                    with contextlib.suppress(ValueError):  # a forged job id may not be a valid one
                        self._site.event(exc.job_id, "error", [exc.reason])
                continue
            try:
                if isinstance(msg, JobOffer):
                    await self._offers.handle(msg)
                else:
                    await self._rounds.handle(msg)
            except Exception:  # the daemon outlives any single message
                log.exception("message_failed", topic=topic)


def run_agent(cfg: AgentConfig) -> None:
    # The ledger, the audit log and the release log are the hospital's: readable by the agent's user only.
    os.umask(0o077)
    try:
        agent = Agent(cfg)
    except StartupError as exc:
        log.error("agent_cannot_start", reason=str(exc))
        print(f"fedsilo agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    # Not `asyncio.run`: at exit it joins the default executor's threads, i.e. waits for a local training step in
    # flight, which `Agent.run` deliberately abandons (see there). Everything durable is closed by `run`.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
