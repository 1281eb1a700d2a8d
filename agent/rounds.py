"""Round execution: fetch the global model, train locally, privatize and account, upload; or only evaluate.

A round's update is released (and charged) at most once: the release log makes handling a round again a resend of
the same bytes, never a second training or a second charge. A secure-aggregation job's round adds sharing, masking and
the unmask phase around this (`agent.secure_rounds`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
import torch

from agent.data import SiteData
from agent.egress import EgressRefusedError, UploadRejectedError, retrying
from agent.offers import Offers
from agent.privacy import BudgetExhaustedError, PrivatizedUpdate, RoundLateError, budget_window_start
from agent.secagg import ExcludedError, SecAggRefusedError
from agent.secure_rounds import SecureRounds, Shared
from agent.site import ActiveJob, Site
from agent.trainer import TrainingStoppedError, train_round
from agent.trainer import evaluate as evaluate_model
from agent.verifier import Verifier
from federation.faults import failpoint
from federation.jobs import JobSpec
from federation.messages import EvalMetrics, EvaluationReport, RoundTask
from federation.models import build_model, check_layout, count_parameters, get_weights, set_weights
from federation.tensors import decode

log = structlog.get_logger(__name__)


class Rounds:
    def __init__(self, site: Site, offers: Offers, verifier: Verifier) -> None:
        self._s = site
        self._offers = offers
        self.secure = SecureRounds(site, verifier)

    async def handle(self, task: RoundTask) -> None:
        s = self._s
        with structlog.contextvars.bound_contextvars(job=task.job_id, round=task.round):
            if task.kind == "closed":
                self.secure.cancel_job(task.job_id)
                s.jobs.pop(task.job_id, None)
                s.state.close_job(task.job_id)
                log.info("job_closed", state=task.state, reason=task.reason)
                return
            job = s.jobs.get(task.job_id)
            if job is None:
                previous = s.state.decision(task.job_id)
                spec_json = s.state.spec_json(task.job_id)
                if previous is None or previous[0] != "accepted" or previous[2] or spec_json is None:
                    log.info("task_ignored", reason="job not accepted here")
                    return
                job = self._offers.activate(task.job_id, JobSpec.model_validate_json(spec_json))
                if job is None:
                    return
            if task.kind == "evaluate":
                await self._evaluate_round(task, job)
            else:
                await self._train_round(task, job)

    def _metrics(self, model: torch.nn.Module, spec: JobSpec, data: SiteData) -> EvalMetrics | None:
        """Only the metrics the job asked for and the policy lets leave, and only over enough records."""
        egress = self._s.policy.egress
        wanted = set(spec.metrics) & set(egress.allowed_metrics)
        if data.n_val < egress.min_records_per_metric or not wanted & {"auc", "loss"}:
            return None
        m = evaluate_model(model, data.x_val, data.y_val)
        return EvalMetrics(n=m.n, loss=m.loss if "loss" in wanted else None, auc=m.auc if "auc" in wanted else None)

    async def _global_model(self, task: RoundTask, spec: JobSpec) -> torch.nn.Module:
        assert task.model_sha256 is not None
        sha = task.model_sha256
        n = count_parameters(spec.model.name, spec.features.input_dim(), spec.model.hidden)
        if n > self._s.policy.models.max_parameters:  # a job accepted under an earlier, looser policy
            raise ValueError(f"the job's model has {n} parameters, above this site's maximum "
                             f"{self._s.policy.models.max_parameters}; not built")
        body = await self._retrying(lambda: self._s.gate.fetch_model(sha), task)
        model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
        weights = decode(body)
        check_layout(weights, get_weights(model))
        set_weights(model, weights)
        return model

    async def _evaluate_round(self, task: RoundTask, job: ActiveJob) -> None:
        model = await self._global_model(task, job.spec)
        report = EvaluationReport(job_id=task.job_id, round=task.round, site=self._s.name,
                                  evaluation=self._metrics(model, job.spec, job.data))
        await self._send(lambda: self._s.gate.send_evaluation(report), task)
        log.info("evaluation_sent", evaluation=report.evaluation.model_dump() if report.evaluation else None)

    async def _train_round(self, task: RoundTask, job: ActiveJob) -> None:
        s = self._s
        secure = job.spec.secure_aggregation is not None
        release = s.state.release(task.job_id, task.round)
        if release is not None and release.sent:
            if secure:  # sent before a restart, perhaps: the unmask phase still needs this site's reveal
                self.secure.start_unmask(task)
            return
        pending = s.privacy.pending(task.job_id, task.round)
        if pending is None:
            if task.round > job.spec.rounds:
                s.stop_job(task.job_id, f"round {task.round} is past the job's plan of {job.spec.rounds} rounds "
                           "that this site accepted and budgeted for")
                return
            if task.deadline is not None and time.time() > task.deadline:
                self._not_released(task, "late", f"round {task.round}'s deadline passed before training began: "
                                   "nothing was trained, released or charged")
                return
            try:
                pending = await self._privatized_round(task, job)
            except BudgetExhaustedError as exc:
                s.stop_job(task.job_id, str(exc))
                return
            except RoundLateError as exc:
                self._not_released(task, "late", str(exc))
                return
            except SecAggRefusedError as exc:  # not in the roster, a dropout, or a roster it must not mask against
                why = "excluded" if isinstance(exc, ExcludedError) else "secagg_refused"
                self._not_released(task, why, f"round {task.round}: {exc}")
                return
            except TrainingStoppedError as exc:
                self._not_released(task, "stopped", f"round {task.round}'s local training reached the round's "
                                   f"deadline or this site's limit of {s.policy.compute.max_round_seconds:g} s and was "
                                   f"{exc}: nothing was released or charged")
                return
            except Exception as exc:  # a bad model, a library error: report it, keep the daemon up
                log.exception("round_failed", reason=str(exc))
                s.event(task.job_id, "error", [f"round {task.round} failed at this site: {exc}"], round=task.round)
                return
        else:
            log.info("resending_released_update")
        failpoint("released_before_upload")
        await self._upload(task, pending)
        if secure:
            self.secure.start_unmask(task)

    def _not_released(self, task: RoundTask, why: str, reason: str) -> None:
        """A round whose update will never be sent: counted, logged, audited, and the aggregator told why."""
        s = self._s
        s.metrics.rounds_not_released.labels(why).inc()
        log.warning("round_not_released", why=why, reason=reason)
        s.log_audit("round_not_released", job_id=task.job_id, round=task.round, why=why, reason=reason,
                    deadline=task.deadline)
        s.event(task.job_id, "error", [reason], round=task.round)

    async def _privatized_round(self, task: RoundTask, job: ActiveJob) -> PrivatizedUpdate:
        spec = job.spec
        started = time.time()
        # A secure round's shares travel while the model is fetched and trained: the roster is frozen meanwhile.
        sharing = asyncio.create_task(self.secure.share(task, job)) if spec.secure_aggregation is not None else None
        try:
            return await self._train_and_release(task, job, started, sharing)
        finally:
            if sharing is not None and not sharing.done():
                sharing.cancel()
            elif sharing is not None and not sharing.cancelled():
                sharing.exception()  # retrieved: when training failed first, the round's own error is what counts

    async def _train_and_release(self, task: RoundTask, job: ActiveJob, started: float,
                                 sharing: asyncio.Task[Shared] | None) -> PrivatizedUpdate:
        s, spec = self._s, job.spec
        model = await self._global_model(task, spec)
        before = get_weights(model)
        evaluation = self._metrics(model, spec, job.data)
        t0 = time.perf_counter()
        # Training stops at the round's deadline or after the site's own limit, whichever comes first.
        stop_at = started + s.policy.compute.max_round_seconds
        if task.deadline is not None:
            stop_at = min(stop_at, task.deadline)
        train_loss = await asyncio.to_thread(train_round, model, spec, job.data, job.plan, s.policy.trainers,
                                             s.name, task.round, stop_at)
        after = get_weights(model)
        delta = {k: after[k] - before[k] for k in before}
        budget = s.policy.privacy.budgets[spec.dataset.name]
        masker, weight = await self.secure.masker(task, job, await sharing) if sharing is not None else (None, 1.0)
        update = s.privacy.privatize(
            s.name, task.job_id, task.round, spec, job.plan, delta, job.data.n_train, evaluation, train_loss,
            budget=budget, budget_since=budget_window_start(budget.reset_period_days),
            share_tracking=s.policy.egress.share_tracking, release_by=task.deadline, masker=masker,
            weight=weight,
        )
        s.metrics.rounds_trained.inc()
        s.update_budget_gauges(spec.dataset.name)
        log.info("round_trained", train_loss=round(train_loss, 4), unit=spec.privacy.unit,
                 epsilon={u.unit: u.epsilon for u in update.envelope.privacy},
                 val_auc=evaluation.auc if evaluation else None, train_s=round(time.perf_counter() - t0, 3))
        return update

    async def _upload(self, task: RoundTask, update: PrivatizedUpdate) -> None:
        s = self._s
        ack = await self._send(lambda: s.gate.send_update(update), task)
        if ack is not None:
            s.metrics.updates_sent.inc()
            s.metrics.bytes_sent.inc(len(update.payload))
            s.state.mark_sent(task.job_id, task.round)
            log.info("update_sent", ack=ack.decode()[:200], bytes=len(update.payload))

    async def _send(self, call: Callable[[], Awaitable[bytes]], task: RoundTask) -> bytes | None:
        """Send through the gate; a refusal by the gate or the aggregator is final and reported."""
        try:
            return await self._retrying(call, task)
        except EgressRefusedError as exc:
            self._s.event(task.job_id, "error", [f"egress refused: {exc}"], round=task.round)
        except UploadRejectedError as exc:
            log.warning("upload_rejected_by_aggregator", status=exc.status, reason=exc.code, detail=exc.detail)
            if exc.code in {"late_update", "job_not_running", "duplicate_conflict"}:
                self._s.state.mark_sent(task.job_id, task.round)  # final: never resend
        return None

    async def _retrying(self, call: Callable[[], Awaitable[bytes]], task: RoundTask) -> bytes:
        """Retry transient failures (network, 5xx) with backoff until the task's deadline."""
        return await retrying(call, task.deadline)
