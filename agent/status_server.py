"""The agent's local HTTP endpoint for its own cluster: liveness, readiness and Prometheus metrics.

It listens inside the hospital (the agent's pod network), serves no job data, and never sends anything
out: it is scraped, so it is not part of the egress path.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.jobs_decided = Counter("fedsilo_agent_job_decisions", "Job offers decided.", ["decision"], registry=r)
        self.rounds_trained = Counter("fedsilo_agent_rounds_trained", "Rounds trained and privatized.", registry=r)
        # `reason`: late (the round's deadline passed before release), stopped (training hit the deadline or the
        # site's max_round_seconds), excluded (secure aggregation: not in the round's roster, or a dropout after a
        # restart) or secagg_refused (a task or roster this site must not mask against). Nothing was released or
        # charged for these.
        self.rounds_not_released = Counter("fedsilo_agent_rounds_not_released",
                                           "Rounds whose update was not released (nor charged), by reason.",
                                           ["reason"], registry=r)
        self.updates_sent = Counter("fedsilo_agent_updates_sent", "Updates acknowledged by the aggregator.",
                                    registry=r)
        self.messages_refused = Counter("fedsilo_agent_messages_refused",
                                        "Offers and tasks refused before any work (signature, expiry, replay).",
                                        registry=r)
        self.egress_refused = Counter("fedsilo_agent_egress_refused", "Sends refused by the egress gate.",
                                      ["what"], registry=r)
        # `unit`: record (ε per patient record) or site (ε per hospital dataset); each unit has its own ledger.
        self.epsilon_spent = Gauge("fedsilo_agent_epsilon_spent", "ε spent on a dataset (all jobs), per unit.",
                                   ["dataset", "unit"], registry=r)
        self.epsilon_budget = Gauge("fedsilo_agent_epsilon_budget", "ε budget of a dataset, per unit.",
                                    ["dataset", "unit"], registry=r)
        self.bytes_sent = Counter("fedsilo_agent_sent_bytes", "Bytes sent to the aggregator (HTTP bodies).",
                                  registry=r)
        # Secure aggregation: reveals sent (shares this site opened for the unmask step), and refusals (`what`:
        # reveal, a whole request refused, e.g. a second split of one round; share, one inbox share that failed to
        # open, e.g. replayed from another round).
        self.secagg_reveals_sent = Counter("fedsilo_agent_secagg_reveals_sent",
                                           "Secure-aggregation reveals accepted by the aggregator.", registry=r)
        self.secagg_refusals = Counter("fedsilo_agent_secagg_refusals",
                                       "Secure-aggregation unmask requests or shares refused.", ["what"], registry=r)
        self.connected = Gauge("fedsilo_agent_broker_connected", "1 while connected to the broker.", registry=r)


def status_app(metrics: AgentMetrics, ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        metrics.connected.set(1 if ok else 0)
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics_view(_: web.Request) -> web.Response:
        metrics.connected.set(1 if ready() else 0)
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
