"""Wire messages between aggregator and agents (MQTT payloads and HTTP envelopes), as pydantic models.

Every payload is canonical JSON (see `canonical_json`) so that it can be hashed and signed byte-for-byte.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from federation.jobs import JobSpec, SiteName, Unit
from federation.schema import Frozen

JobId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9\-]{2,80}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PROTOCOL_VERSION = 1


def canonical_json(model: Frozen) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that get hashed and signed."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class JobOffer(Frozen):
    """Signed by the aggregator. `requester` is the operator identity (certificate) that submitted the job."""

    kind: Literal["offer"] = "offer"
    job_id: JobId
    spec: JobSpec
    requester: str
    issued_at: float
    expires_at: float
    nonce: Nonce
    protocol: int = PROTOCOL_VERSION


class RoundTask(Frozen):
    """Round `round` starts from global model `model_sha256` (fetched from the agent's configured aggregator).

    kind "train": evaluate the global model, train locally, upload a privatized update.
    kind "evaluate": only evaluate the final global model and report metrics.
    kind "closed": the job ended (state and reason given); the agent forgets it.
    """

    kind: Literal["train", "evaluate", "closed"]
    job_id: JobId
    round: int = Field(ge=0)
    model_sha256: Sha256 | None = None
    deadline: float | None = None
    state: str | None = None
    reason: str | None = None
    issued_at: float
    expires_at: float
    nonce: Nonce


class SiteStatus(Frozen):
    site: SiteName
    state: Literal["online", "offline"]
    at: float
    active_jobs: list[str] = Field(default_factory=list)
    version: str = ""


class SiteEvent(Frozen):
    """An agent's answer about a job: accepted, refused (with every reason), or stopped mid-job."""

    site: SiteName
    job_id: JobId
    kind: Literal["accepted", "refused", "error", "stopped"]
    round: int | None = None
    reasons: list[str] = Field(default_factory=list)
    epsilon_planned: float | None = None  # in the job's unit
    # Per unit the site will be charged in (both when its policy adds the site unit to a record-level job).
    planned: dict[Unit, float] = Field(default_factory=dict, max_length=2)
    at: float


class EvalMetrics(Frozen):
    """Validation metrics of one global model at one site: aggregates over `n` records, never rows."""

    n: int = Field(ge=0)
    loss: float | None = None
    auc: float | None = None

    @field_validator("loss", "auc")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("metric must be finite")
        return v


class UnitSpend(Frozen):
    """The ε a site has spent on a job in one unit (per patient record, or per site), and the σ of the mechanism
    behind it: DP-SGD's for the record unit, the update-level noise's for the site unit."""

    unit: Unit
    epsilon: float | None = Field(ge=0)  # None: that mechanism ran without noise (no guarantee)
    noise_multiplier: float = Field(ge=0, le=1e4)


class UpdateEnvelope(Frozen):
    """Metadata sent with an update (HTTP header); the body is the safetensors update with this sha256."""

    job_id: JobId
    round: int = Field(ge=1)
    site: SiteName
    num_samples: int = Field(ge=1)
    sha256: Sha256
    # Metrics of the global model this round started from (model version round-1), on local validation;
    # None when the site's policy lets no metric leave.
    evaluation: EvalMetrics | None
    train_loss: float
    # ε spent on this job so far, this round included, in the job's unit (`spec.privacy.unit`); None when the job
    # runs without noise (no guarantee).
    epsilon: float | None = Field(ge=0)
    # The same per unit the site's mechanisms protect: the job's unit, and the site unit too where the site's policy
    # also requires update-level noise. A `site` entry means the update carries update-level noise.
    privacy: list[UnitSpend] = Field(default_factory=list, max_length=2)
    # The site's policy allows its per-site metrics to be logged to experiment tracking.
    share_tracking: bool = True

    @field_validator("privacy")
    @classmethod
    def _one_per_unit(cls, v: list[UnitSpend]) -> list[UnitSpend]:
        if len({s.unit for s in v}) != len(v):
            raise ValueError("privacy lists a unit twice")
        return v

    def spend(self, unit: str) -> UnitSpend | None:
        return next((s for s in self.privacy if s.unit == unit), None)

    @field_validator("train_loss")
    @classmethod
    def _finite_loss(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("train_loss must be finite")
        return v


class EvaluationReport(Frozen):
    job_id: JobId
    round: int = Field(ge=0)
    site: SiteName
    evaluation: EvalMetrics | None


def parse_json(model: type[Frozen], payload: bytes | str) -> Any:
    return model.model_validate_json(payload)


# HTTP: headers and paths shared by the aggregator's API and the agents' egress gate.
SITE_HEADER = "X-Fedsilo-Site"  # plaintext development mode only; under mTLS the certificate names the site
ENVELOPE_HEADER = "X-Fedsilo-Envelope"


def blob_path(sha: str) -> str:
    return f"/api/v1/blobs/{sha}"


def update_path(job_id: str, rnd: int) -> str:
    return f"/api/v1/jobs/{job_id}/rounds/{rnd}/update"


def evaluation_path(job_id: str, rnd: int) -> str:
    return f"/api/v1/jobs/{job_id}/rounds/{rnd}/evaluation"
