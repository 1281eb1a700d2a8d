"""The per-hospital agent daemon: verify → policy → data → train → privatize → egress, and stay up.

Messages are handled one at a time by a single worker (a round's training blocks nothing but the next
message; heartbeats run beside it). Retained offers and tasks are re-delivered after any reconnect or
restart; the verifier drops exact re-deliveries and the release log makes handling a round again harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
import torch
from aiohttp import web

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.data import SiteData, load_site_data
from agent.egress import EgressGate, EgressRefusedError, UploadRejectedError
from agent.policy import DatasetPolicy, SitePolicy, endpoint_of, evaluate
from agent.privacy import (
    BudgetExhaustedError,
    PrivacyEngine,
    PrivatizedUpdate,
    budget_window_start,
)
from agent.privacy_policy import SitePrivacy, per_unit, plan_privacy
from agent.state import AgentState
from agent.status_server import AgentMetrics, status_app
from agent.trainer import evaluate as evaluate_model
from agent.trainer import train_round
from agent.verifier import MessageRefusedError, Verifier
from federation import topics
from federation.faults import failpoint
from federation.jobs import JobSpec
from federation.messages import (
    PROTOCOL_VERSION,
    EvalMetrics,
    EvaluationReport,
    JobOffer,
    RoundTask,
    SiteEvent,
    SiteStatus,
    canonical_json,
)
from federation.models import build_model, check_layout, get_weights, set_weights
from federation.mqtt import MqttLink
from federation.signing import load_public_key
from federation.tensors import decode

log = structlog.get_logger(__name__)
VERSION = "0.1.0"
RETRY_MAX_S = 4.0  # the aggregator restarts in seconds; a longer backoff would only idle the site


UNITS = ("site", "record")


@dataclass
class ActiveJob:
    spec: JobSpec
    data: SiteData
    plan: SitePrivacy  # what this site applies: recomputed identically after a restart (deterministic)


class StartupError(Exception):
    """The agent cannot run safely with this configuration; the message says what to fix."""


def load_data(ds: DatasetPolicy, spec: JobSpec) -> SiteData:
    return load_site_data(ds.path, spec.features, spec.dataset)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.site = cfg.site
        try:
            self.policy = SitePolicy.load(cfg.policy_file)
            public_key = load_public_key(cfg.aggregator_public_key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load the policy or the aggregator's public key: {exc}") from exc
        if self.policy.site != self.site:
            raise StartupError(f"policy {cfg.policy_file} is for site {self.policy.site!r}, not {self.site!r}")
        broker = cfg.broker if cfg.broker.tls is not None else cfg.broker.model_copy(update={"tls": cfg.tls})
        self.endpoints = [f"{broker.host}:{broker.port}", endpoint_of(str(cfg.aggregator_url))]
        blocked = [e for e in self.endpoints if e not in self.policy.egress.allowed_endpoints]
        if blocked:
            raise StartupError(f"configured endpoint(s) {blocked} are not on the egress allowlist of "
                               f"{cfg.policy_file}; the agent would have no allowed way to talk to the federation")
        self._state = AgentState(cfg.state_dir / "agent.db")
        self._audit = AuditLog(cfg.audit_log)
        self._verifier = Verifier(self.site, public_key, self._state)
        self._privacy = PrivacyEngine(self._state)
        self._jobs: dict[str, ActiveJob] = {}
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        offline = SiteStatus(site=self.site, state="offline", at=0.0, version=VERSION)
        self._link = MqttLink(
            f"fedsilo-agent-{self.site}", broker, self._on_message,
            subscriptions=[topics.offers(self.site), topics.tasks(self.site)],
            will=(topics.status(self.site), canonical_json(offline)), on_connect=self._publish_status,
            log_context={"site": self.site},
        )
        self.metrics = AgentMetrics()
        self._gate = EgressGate(self.site, str(cfg.aggregator_url), cfg.tls, self._link, self.policy.egress,
                                self._audit, on_refusal=lambda what: self.metrics.egress_refused.labels(what).inc())
        for name in self.policy.privacy.budgets:
            self._update_budget_gauges(name)

    def _update_budget_gauges(self, dataset: str) -> None:
        budget = self.policy.privacy.budgets[dataset]
        for unit in self.policy.privacy.allowed_units:
            total = per_unit(budget.epsilon, unit)
            self.metrics.epsilon_budget.labels(dataset, unit).set(total if total is not None else 0.0)
            self.metrics.epsilon_spent.labels(dataset, unit).set(
                self._state.spent(dataset, unit, budget_window_start(budget.reset_period_days)))

    def _log_audit(self, event: str, **fields: Any) -> None:
        self._audit.append(event, site=self.site, **fields)
        self._state.set_audit_head(*self._audit.head)

    # ---------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(site=self.site)
        torch.set_num_threads(self.cfg.torch_threads)
        await self._gate.start()
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
        offline = SiteStatus(site=self.site, state="offline", at=time.time(), version=VERSION)
        await self._link.stop(final=(topics.status(self.site), canonical_json(offline)))
        await self._gate.close()
        if runner is not None:
            await runner.cleanup()
        self._state.close()
        log.info("agent_stopped")

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._queue.put_nowait((topic, payload))

    def _publish_status(self) -> None:
        self._gate.publish_status(
            SiteStatus(site=self.site, state="online", at=time.time(), active_jobs=sorted(self._jobs),
                       version=VERSION)
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            if self._link.connected.is_set():
                self._publish_status()

    def _event(self, job_id: str, kind: str, reasons: list[str], **extra: Any) -> None:
        self._gate.publish_event(SiteEvent(site=self.site, job_id=job_id, kind=kind,  # type: ignore[arg-type]
                                           reasons=reasons, at=time.time(), **extra))

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
                self._log_audit("message_refused", job_id=exc.job_id, reason=exc.reason)
                if exc.job_id is not None:
                    with contextlib.suppress(ValueError):  # a forged job id may not be a valid one
                        self._event(exc.job_id, "error", [exc.reason])
                continue
            try:
                if isinstance(msg, JobOffer):
                    await self._handle_offer(msg)
                else:
                    await self._handle_task(msg)
            except Exception:  # the daemon outlives any single message
                log.exception("message_failed", topic=topic)

    # ---------------------------------------------------------------- offers
    async def _handle_offer(self, offer: JobOffer) -> None:
        with structlog.contextvars.bound_contextvars(job=offer.job_id):
            previous = self._state.decision(offer.job_id)
            if previous is not None:  # a new signature on a job already decided: repeat the answer
                earlier, reasons, closed = previous
                if earlier == "accepted" and not closed and offer.job_id not in self._jobs:
                    self._activate(offer.job_id, offer.spec)
                self._event(offer.job_id, earlier, reasons)
                return
            spec = offer.spec
            budget = self.policy.privacy.budgets.get(spec.dataset.name)
            since = budget_window_start(budget.reset_period_days if budget else None)
            spent = {u: self._state.committed(spec.dataset.name, u, since) for u in UNITS}
            decision, data = await asyncio.to_thread(
                evaluate, self.policy, spec, self.site, endpoints=self.endpoints, spent=spent,
                active_jobs=len(self._state.active_jobs()), load=load_data,
            )
            if offer.protocol != PROTOCOL_VERSION:
                decision.reasons.append(f"protocol {offer.protocol} is not supported (this agent: {PROTOCOL_VERSION})")
            verdict = "accepted" if decision.accepted else "refused"
            self._state.record_decision(offer.job_id, spec.model_dump_json(), verdict, decision.reasons,
                                        spec.dataset.name, decision.planned)
            self._log_audit(
                "job_decision", job_id=offer.job_id, requester=offer.requester, purpose=spec.purpose,
                dataset=spec.dataset.name, decision=verdict, reasons=decision.reasons, unit=spec.privacy.unit,
                epsilon_before=decision.epsilon_before,
                epsilon_after=decision.epsilon_after if decision.accepted else decision.epsilon_before,
                epsilon_planned=decision.epsilon_planned, epsilon_planned_by_unit=decision.planned,
            )
            self.metrics.jobs_decided.labels(verdict).inc()
            if data is not None and decision.plan is not None:
                self._jobs[offer.job_id] = ActiveJob(spec, data, decision.plan)
            log.info("job_decision", decision=verdict, reasons=decision.reasons, unit=spec.privacy.unit,
                     epsilon=decision.planned)
            self._event(offer.job_id, verdict, decision.reasons, epsilon_planned=decision.epsilon_planned,
                        planned=decision.planned if decision.accepted else {})

    def _activate(self, job_id: str, spec: JobSpec) -> ActiveJob | None:
        """Reload an accepted job after a restart; stop taking part if its data became unavailable."""
        ds = self.policy.datasets.get(spec.dataset.name)
        reason = "the dataset is no longer in this site's policy"
        if ds is not None:
            try:
                data = load_data(ds, spec)
                job = ActiveJob(spec, data, plan_privacy(spec, self.policy.privacy, data.n_train))
            except Exception as exc:  # DataError or anything the file throws at us
                reason = str(exc)
            else:
                self._jobs[job_id] = job
                return job
        self._stop_job(job_id, reason)
        return None

    def _stop_job(self, job_id: str, reason: str) -> None:
        log.warning("job_stopped", job=job_id, reason=reason)
        self._log_audit("job_stopped", job_id=job_id, reason=reason)
        self._state.close_job(job_id)
        self._jobs.pop(job_id, None)
        self._event(job_id, "stopped", [reason])

    # ---------------------------------------------------------------- rounds
    async def _handle_task(self, task: RoundTask) -> None:
        with structlog.contextvars.bound_contextvars(job=task.job_id, round=task.round):
            if task.kind == "closed":
                self._jobs.pop(task.job_id, None)
                self._state.close_job(task.job_id)
                log.info("job_closed", state=task.state, reason=task.reason)
                return
            job = self._jobs.get(task.job_id)
            if job is None:
                previous = self._state.decision(task.job_id)
                spec_json = self._state.spec_json(task.job_id)
                if previous is None or previous[0] != "accepted" or previous[2] or spec_json is None:
                    log.info("task_ignored", reason="job not accepted here")
                    return
                job = self._activate(task.job_id, JobSpec.model_validate_json(spec_json))
                if job is None:
                    return
            if task.kind == "evaluate":
                await self._evaluate_round(task, job)
            else:
                await self._train_round(task, job)

    def _metrics(self, model: torch.nn.Module, spec: JobSpec, data: SiteData) -> EvalMetrics | None:
        """Only the metrics the job asked for and the policy lets leave, and only over enough records."""
        egress = self.policy.egress
        wanted = set(spec.metrics) & set(egress.allowed_metrics)
        if data.n_val < egress.min_records_per_metric or not wanted & {"auc", "loss"}:
            return None
        m = evaluate_model(model, data.x_val, data.y_val)
        return EvalMetrics(n=m.n, loss=m.loss if "loss" in wanted else None, auc=m.auc if "auc" in wanted else None)

    async def _global_model(self, task: RoundTask, spec: JobSpec) -> torch.nn.Module:
        assert task.model_sha256 is not None
        sha = task.model_sha256
        body = await self._retrying(lambda: self._gate.fetch_model(sha), task)
        model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
        weights = decode(body)
        check_layout(weights, get_weights(model))
        set_weights(model, weights)
        return model

    async def _evaluate_round(self, task: RoundTask, job: ActiveJob) -> None:
        model = await self._global_model(task, job.spec)
        report = EvaluationReport(job_id=task.job_id, round=task.round, site=self.site,
                                  evaluation=self._metrics(model, job.spec, job.data))
        await self._send(lambda: self._gate.send_evaluation(report), task)
        log.info("evaluation_sent", evaluation=report.evaluation.model_dump() if report.evaluation else None)

    async def _train_round(self, task: RoundTask, job: ActiveJob) -> None:
        release = self._state.release(task.job_id, task.round)
        if release is not None and release.sent:
            return
        pending = self._privacy.pending(task.job_id, task.round)
        if pending is None:
            if task.round > job.spec.rounds:
                self._stop_job(task.job_id, f"round {task.round} is past the job's plan of {job.spec.rounds} rounds "
                               "that this site accepted and budgeted for")
                return
            try:
                pending = await self._privatized_round(task, job)
            except BudgetExhaustedError as exc:
                self._stop_job(task.job_id, str(exc))
                return
            except Exception as exc:  # a bad model, a library error: report it, keep the daemon up
                log.exception("round_failed", reason=str(exc))
                self._event(task.job_id, "error", [f"round {task.round} failed at this site: {exc}"],
                            round=task.round)
                return
        else:
            log.info("resending_released_update")
        failpoint("released_before_upload")
        await self._upload(task, pending)

    async def _privatized_round(self, task: RoundTask, job: ActiveJob) -> PrivatizedUpdate:
        spec = job.spec
        model = await self._global_model(task, spec)
        before = get_weights(model)
        evaluation = self._metrics(model, spec, job.data)
        t0 = time.perf_counter()
        train_loss = await asyncio.to_thread(train_round, model, spec, job.data, job.plan, self.policy.trainers,
                                             self.site, task.round)
        after = get_weights(model)
        delta = {k: after[k] - before[k] for k in before}
        budget = self.policy.privacy.budgets[spec.dataset.name]
        update = self._privacy.privatize(
            self.site, task.job_id, task.round, spec, job.plan, delta, job.data.n_train, evaluation, train_loss,
            budget=budget, budget_since=budget_window_start(budget.reset_period_days),
            share_tracking=self.policy.egress.share_tracking,
        )
        self.metrics.rounds_trained.inc()
        self._update_budget_gauges(spec.dataset.name)
        log.info("round_trained", train_loss=round(train_loss, 4), unit=spec.privacy.unit,
                 epsilon={s.unit: s.epsilon for s in update.envelope.privacy},
                 val_auc=evaluation.auc if evaluation else None, train_s=round(time.perf_counter() - t0, 3))
        return update

    async def _upload(self, task: RoundTask, update: PrivatizedUpdate) -> None:
        ack = await self._send(lambda: self._gate.send_update(update), task)
        if ack is not None:
            self.metrics.updates_sent.inc()
            self.metrics.bytes_sent.inc(len(update.payload))
            self._state.mark_sent(task.job_id, task.round)
            log.info("update_sent", ack=ack.decode()[:200], bytes=len(update.payload))

    async def _send(self, call: Callable[[], Awaitable[bytes]], task: RoundTask) -> bytes | None:
        """Send through the gate; a refusal by the gate or the aggregator is final and reported."""
        try:
            return await self._retrying(call, task)
        except EgressRefusedError as exc:
            self._event(task.job_id, "error", [f"egress refused: {exc}"], round=task.round)
        except UploadRejectedError as exc:
            log.warning("upload_rejected_by_aggregator", status=exc.status, reason=exc.code, detail=exc.detail)
            if exc.code in {"late_update", "job_not_running", "duplicate_conflict"}:
                self._state.mark_sent(task.job_id, task.round)  # final: never resend
        return None

    async def _retrying(self, call: Callable[[], Awaitable[bytes]], task: RoundTask) -> bytes:
        """Retry transient failures (network, 5xx) with backoff until the task's deadline."""
        delay = 0.25
        while True:
            try:
                return await call()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if isinstance(exc, aiohttp.ClientResponseError) and exc.status < 500:
                    raise
                if task.deadline is not None and time.time() + delay > task.deadline:
                    raise UploadRejectedError(0, "deadline_passed", f"gave up: {exc}") from exc
                log.warning("aggregator_unreachable", error=str(exc)[:200], retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)


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
