"""Job acceptance: an offer checked against the site's policy, the decision recorded, audited and answered; an
accepted job reloaded after a restart, or stopped when its data became unavailable."""

from __future__ import annotations

import asyncio
import math

import structlog

from agent.policy import evaluate
from agent.privacy import budget_window_start
from agent.privacy_policy import plan_privacy
from agent.site import UNITS, ActiveJob, Site, load_data
from federation.jobs import JobSpec
from federation.messages import PROTOCOL_VERSION, JobOffer

log = structlog.get_logger(__name__)


class Offers:
    def __init__(self, site: Site) -> None:
        self._s = site

    async def handle(self, offer: JobOffer) -> None:
        s = self._s
        with structlog.contextvars.bound_contextvars(job=offer.job_id):
            previous = s.state.decision(offer.job_id)
            if previous is not None:  # a new signature on a job already decided: repeat the answer
                earlier, reasons, closed = previous
                if earlier == "accepted" and not closed and offer.job_id not in s.jobs:
                    self.activate(offer.job_id, offer.spec)
                s.event(offer.job_id, earlier, reasons, **self._share_key(offer.job_id, offer.spec, earlier))
                return
            spec = offer.spec
            budget = s.policy.privacy.budgets.get(spec.dataset.name)
            since = budget_window_start(budget.reset_period_days if budget else None)
            spent = {u: s.state.committed(spec.dataset.name, u, since) for u in UNITS}
            decision, data = await asyncio.to_thread(
                evaluate, s.policy, spec, s.name, endpoints=s.endpoints, spent=spent,
                active_jobs=len(s.state.active_jobs()), load=load_data,
            )
            if offer.protocol != PROTOCOL_VERSION:
                decision.reasons.append(f"protocol {offer.protocol} is not supported (this agent: {PROTOCOL_VERSION})")
            verdict = "accepted" if decision.accepted else "refused"
            s.state.record_decision(offer.job_id, spec.model_dump_json(), verdict, decision.reasons,
                                    spec.dataset.name, decision.planned)
            s.log_audit(
                "job_decision", job_id=offer.job_id, requester=offer.requester, purpose=spec.purpose,
                dataset=spec.dataset.name, decision=verdict, reasons=decision.reasons, unit=spec.privacy.unit,
                epsilon_before=decision.epsilon_before,
                epsilon_after=decision.epsilon_after if decision.accepted else decision.epsilon_before,
                epsilon_planned=decision.epsilon_planned, epsilon_planned_by_unit=decision.planned,
            )
            s.metrics.jobs_decided.labels(verdict).inc()
            if data is not None and decision.plan is not None:
                s.jobs[offer.job_id] = ActiveJob(spec, data, decision.plan)
            log.info("job_decision", decision=verdict, reasons=decision.reasons, unit=spec.privacy.unit,
                     epsilon=decision.planned)
            # A job without noise (allow_no_noise, where a policy permits it) has no guarantee: its ε is ∞ here and
            # absent on the wire, which carries finite numbers only.
            planned = {u: e for u, e in decision.planned.items() if math.isfinite(e)}
            eps = decision.epsilon_planned
            s.event(offer.job_id, verdict, decision.reasons,
                    epsilon_planned=eps if eps is not None and math.isfinite(eps) else None,
                    planned=planned if decision.accepted else {}, **self._share_key(offer.job_id, spec, verdict))

    def _share_key(self, job_id: str, spec: JobSpec, verdict: str) -> dict[str, str]:
        """An accepted secure-aggregation job's answer carries the site's share key for the job (the same one every
        time: it is derived from the site's secret, so a repeated answer repeats it)."""
        if verdict != "accepted" or spec.secure_aggregation is None:
            return {}
        return {"share_key": self._s.share_keys.public(job_id)}

    def activate(self, job_id: str, spec: JobSpec) -> ActiveJob | None:
        """Reload an accepted job after a restart; stop taking part if its data became unavailable."""
        s = self._s
        ds = s.policy.datasets.get(spec.dataset.name)
        reason = "the dataset is no longer in this site's policy"
        if ds is not None:
            try:
                data = load_data(ds, spec)
                job = ActiveJob(spec, data, plan_privacy(spec, s.policy.privacy, data.n_train))
            except Exception as exc:  # DataError or anything the file throws at us
                reason = str(exc)
            else:
                s.jobs[job_id] = job
                return job
        s.stop_job(job_id, reason)
        return None
