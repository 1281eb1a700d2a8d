"""Which experiment-tracking sinks are active, and how hard to retry them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from federation.schema import Frozen

# SageMaker names experiments `^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,119}`; a job id is appended to the prefix.
ExperimentPrefix = Annotated[str, Field(pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,38}$")]


class LocalSinkConfig(Frozen):
    """Tracking records as files beside each job's report (`<report_dir>/<job>/params.json`, `metrics.jsonl`)."""

    enabled: bool = True


class SageMakerSinkConfig(Frozen):
    """Amazon SageMaker Experiments. Credentials come from the standard AWS chain (IRSA on EKS, env, profile)."""

    enabled: bool = True
    # One experiment per job: `<prefix>-<job id>`, or the job id alone (which starts with the job's name) when no
    # prefix is set; runs `aggregator` and `client-<site>` inside it. A prefix lets an IAM policy scope the
    # aggregator's role to `experiment/<prefix>-*`.
    experiment_prefix: ExperimentPrefix | None = None
    region: str | None = None
    # A role to assume before calling SageMaker (None: use the chain's identity as it is, e.g. the IRSA role).
    role_arn: str | None = None
    # Where `log_artifact` uploads files (the final global model); None: artifacts are not sent.
    artifact_bucket: str | None = None
    artifact_prefix: str = "fedsilo"
    # The SDK reports usage to AWS unless told not to; a hospital network rarely wants extra egress.
    telemetry: bool = False
    # Attempts per API call inside botocore (its own short backoff) before the outbox's backoff takes over.
    max_attempts: int = Field(default=3, ge=1, le=10)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    read_timeout_s: float = Field(default=20.0, gt=0, le=600)


class TrackingConfig(Frozen):
    """The local sink is on unless switched off; SageMaker only when configured. The job report on disk
    (`aggregator.report.write_report`) is always written."""

    local: LocalSinkConfig = LocalSinkConfig()
    sagemaker: SageMakerSinkConfig | None = None
    # The durable buffer (SQLite) of records not yet delivered; default: beside the SQLite state, else in
    # the report directory.
    outbox: Path | None = None
    # Exponential backoff of a failing sink: first delay, doubling up to the maximum.
    retry_initial_s: float = Field(default=1.0, gt=0, le=3600)
    retry_max_s: float = Field(default=300.0, gt=0, le=86_400)
    # Delivered records are kept this long (their keys stop a replayed summary from sending them again).
    keep_delivered_days: float = Field(default=90.0, gt=0, le=3650)
    # Records handed to a sink per delivery.
    batch_size: int = Field(default=200, ge=1, le=10_000)
    # On shutdown, how long one last flush may take before the rest waits in the outbox for the next start.
    close_timeout_s: float = Field(default=1.0, ge=0, le=600)

    @property
    def experiment_prefix(self) -> str | None:
        """What every sink names a job's experiment after (a job's `tags.experiment` wins; see `records`)."""
        return self.sagemaker.experiment_prefix if self.sagemaker is not None else None
