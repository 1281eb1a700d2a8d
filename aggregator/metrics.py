"""Prometheus metrics of the aggregator, on a registry of its own (so several services can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AggregatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rounds_completed = Counter(
            "fedsilo_rounds_completed", "Training rounds finalized.", ["job"], registry=r
        )
        self.round_duration = Histogram(
            "fedsilo_round_duration_seconds", "Time from a round's task to its finalization.", ["kind"],
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=r,
        )
        self.updates_received = Counter(
            "fedsilo_updates_received", "Updates accepted and stored.", ["site"], registry=r
        )
        self.updates_rejected = Counter(
            "fedsilo_updates_rejected", "Uploads refused, by reason.", ["site", "reason"], registry=r
        )
        self.site_messages_rejected = Counter(
            "fedsilo_site_messages_rejected", "MQTT messages from sites dropped before they were handled, by reason "
            "(too_large, rate_limited, overloaded, malformed, site_mismatch).", ["site", "reason"], registry=r,
        )
        self.sites_online = Gauge("fedsilo_sites_online", "Sites whose agent is connected.", registry=r)
        self.site_up = Gauge(
            "fedsilo_site_up", "1 while a site's agent is online (heartbeats arriving), else 0.", ["site"], registry=r
        )
        self.site_last_seen = Gauge(
            "fedsilo_site_last_seen_timestamp_seconds", "When a site's last heartbeat arrived (Unix time).",
            ["site"], registry=r,
        )
        self.global_auc = Gauge(
            "fedsilo_global_validation_auc", "Sample-weighted validation AUC of the latest global model.",
            ["job"], registry=r,
        )
        self.global_loss = Gauge(
            "fedsilo_global_validation_loss", "Sample-weighted validation loss of the latest global model.",
            ["job"], registry=r,
        )
        self.site_epsilon = Gauge(
            "fedsilo_site_epsilon", "Privacy loss ε a site reports having spent on a job, in `unit`: record (per "
            "patient record, DP-SGD), site (per hospital dataset, update-level noise), or site_alone / record_alone "
            "(secure aggregation: the site's own share of the noise alone).", ["job", "site", "unit"],
            registry=r,
        )
        self.bytes_received = Counter(
            "fedsilo_http_received_bytes", "Request body bytes received over HTTP.", registry=r
        )
        self.bytes_sent = Counter("fedsilo_http_sent_bytes", "Response body bytes sent over HTTP.", registry=r)
        self.jobs = Gauge("fedsilo_jobs", "Jobs by state.", ["state"], registry=r)
        self.job_events_dropped = Counter(
            "fedsilo_job_events_dropped", "Closed rounds whose tracking records waited for the job's end (the "
            "job-event queue was full).", registry=r,
        )
        self.quarantined_rows = Counter(
            "fedsilo_quarantined_rows", "Stored rows that failed their checks at start-up and were moved to the "
            "quarantine (their jobs fail with the reason).", ["table"], registry=r,
        )
        self.audit_head_conflicts = Counter(
            "fedsilo_audit_head_conflicts", "Audit-chain heads a site reported with the same entry count as one "
            "recorded but another hash: its local audit log was rewritten (or two agents share its name).",
            ["site"], registry=r,
        )
        self.site_refusals = Counter(
            "fedsilo_job_refusals", "Job offers a site refused.", ["site"], registry=r
        )

    def observe_spend(self, job_id: str, site: str, spend: dict[str, float | None]) -> None:
        """A site's ε per unit, from its latest update (a unit without a guarantee is not exported)."""
        for unit, eps in spend.items():
            if eps is not None:
                self.site_epsilon.labels(job_id, site, unit).set(eps)
