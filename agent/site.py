"""What the agent's parts share about this site: its policy, state, audit log, egress gate, metrics and the jobs it
takes part in, with the few actions every part needs (audit, answer the aggregator, stop a job)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.data import SiteData, load_site_data
from agent.egress import EgressGate
from agent.policy import DatasetPolicy, SitePolicy
from agent.privacy import PrivacyEngine, budget_window_start
from agent.privacy_policy import SitePrivacy, per_unit
from agent.secagg import KEY_FILE, ShareKeys
from agent.state import AgentState
from agent.status_server import AgentMetrics
from federation.bounds import MAX_REASONS, MAX_TEXT
from federation.jobs import JobSpec
from federation.messages import SiteEvent

log = structlog.get_logger(__name__)
UNITS = ("site", "record")


@dataclass
class ActiveJob:
    spec: JobSpec
    data: SiteData
    plan: SitePrivacy  # what this site applies: recomputed identically after a restart (deterministic)


def load_data(ds: DatasetPolicy, spec: JobSpec) -> SiteData:
    return load_site_data(ds.path, spec.features, spec.dataset)


@dataclass
class Site:
    cfg: AgentConfig
    policy: SitePolicy
    state: AgentState
    audit: AuditLog
    gate: EgressGate
    metrics: AgentMetrics
    privacy: PrivacyEngine
    endpoints: list[str]
    jobs: dict[str, ActiveJob] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.site

    @functools.cached_property
    def share_keys(self) -> ShareKeys:
        """Secure aggregation's per-job share keys (their master secret is made on first use)."""
        return ShareKeys(self.cfg.state_dir / KEY_FILE)

    def log_audit(self, event: str, **fields: Any) -> None:
        self.audit.append(event, site=self.name, **fields)
        self.state.set_audit_head(*self.audit.head)

    def event(self, job_id: str, kind: str, reasons: list[str], **extra: Any) -> None:
        """Answer the aggregator about a job. Reasons are cut to what the wire allows (the audit keeps them whole)
        and leave through the gate, which names datasets by id instead of by path."""
        short = [r if len(r) <= MAX_TEXT else r[: MAX_TEXT - 1] + "…" for r in reasons[:MAX_REASONS]]
        self.gate.publish_event(SiteEvent(site=self.name, job_id=job_id, kind=kind,  # type: ignore[arg-type]
                                          reasons=short, at=time.time(), **self.audit_head(), **extra))

    def audit_head(self) -> dict[str, Any]:
        """The audit chain's head, carried in every status and event so the aggregator keeps a copy of it."""
        seq, head = self.audit.head
        return {"audit_seq": seq, "audit_head": head}

    def stop_job(self, job_id: str, reason: str) -> None:
        log.warning("job_stopped", job=job_id, reason=reason)
        self.log_audit("job_stopped", job_id=job_id, reason=reason)
        self.state.close_job(job_id)
        self.jobs.pop(job_id, None)
        self.event(job_id, "stopped", [reason])

    def update_budget_gauges(self, dataset: str) -> None:
        budget = self.policy.privacy.budgets[dataset]
        for unit in self.policy.privacy.allowed_units:
            total = per_unit(budget.epsilon, unit)
            self.metrics.epsilon_budget.labels(dataset, unit).set(total if total is not None else 0.0)
            self.metrics.epsilon_spent.labels(dataset, unit).set(
                self.state.spent(dataset, unit, budget_window_start(budget.reset_period_days)))
