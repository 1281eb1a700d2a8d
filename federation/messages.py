"""Wire messages between aggregator and agents (MQTT payloads and HTTP envelopes), as pydantic models.

Every payload is canonical JSON (see `canonical_json`) so that it can be hashed and signed byte-for-byte.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from federation.bounds import MAX_AUDIT_SEQ, MAX_EPSILON, MAX_LOSS, MAX_REASONS, MAX_ROUND, MAX_SAMPLES, MAX_TEXT
from federation.jobs import JobSpec, SiteName, Unit
from federation.schema import Frozen

JobId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9\-]{2,80}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PROTOCOL_VERSION = 1


def canonical_json(model: Frozen) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that get hashed and signed."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
# urlsafe base64 of a 32-byte X25519 public key (secure aggregation: `federation.secagg`)
PublicKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}=$")]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class SiteMessage(Frozen):
    """What a site sends (MQTT status and events, HTTP envelopes and reports), parsed as hostile: strict types
    (no `true` for 1, no "5" for 5), no NaN or Infinity, every number within `federation.bounds` and every list
    and text bounded, so nothing accepted is too large to store, sum or serve."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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
    # A secure-aggregation job's train round: every participant's per-job share key (`SiteEvent.share_key`), to
    # which the site seals the shares it sends (`federation.secagg.messages`).
    share_keys: dict[SiteName, PublicKey] | None = Field(default=None, max_length=1000)
    issued_at: float
    expires_at: float
    nonce: Nonce


class AuditHeadCarrier(SiteMessage):
    """The head of the site's hash-chained audit log when the message was sent (`agent.audit`): its entry count and
    the hash of its last entry. The aggregator keeps the latest per site, outside the hospital's control, so that a
    local chain rewritten afterwards no longer contains it (`fedsilo audit verify --aggregator-head`)."""

    audit_seq: int | None = Field(default=None, ge=0, le=MAX_AUDIT_SEQ)
    audit_head: Sha256 | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> AuditHeadCarrier:
        if (self.audit_seq is None) != (self.audit_head is None):
            raise ValueError("audit_seq and audit_head go together")
        return self


class SiteStatus(AuditHeadCarrier):
    """A heartbeat, or the last will. `at` is the sender's clock: the aggregator keeps its own receive time."""

    site: SiteName
    state: Literal["online", "offline"]
    at: float
    active_jobs: list[JobId] = Field(default_factory=list, max_length=100)
    version: str = Field(default="", max_length=64)


class SiteEvent(AuditHeadCarrier):
    """An agent's answer about a job: accepted, refused (with every reason), or stopped mid-job."""

    site: SiteName
    job_id: JobId
    kind: Literal["accepted", "refused", "error", "stopped"]
    round: int | None = Field(default=None, ge=0, le=MAX_ROUND)
    reasons: list[Text] = Field(default_factory=list, max_length=MAX_REASONS)
    epsilon_planned: float | None = Field(default=None, ge=0, le=MAX_EPSILON)  # in the job's unit
    # Per unit the site will be charged in (both when its policy adds the site unit to a record-level job).
    planned: dict[Unit, Annotated[float, Field(ge=0, le=MAX_EPSILON)]] = Field(default_factory=dict, max_length=2)
    # Accepting a secure-aggregation job: the site's per-job X25519 key that its peers seal shares to.
    share_key: PublicKey | None = None
    at: float


class EvalMetrics(SiteMessage):
    """Validation metrics of one global model at one site: aggregates over `n` records, never rows."""

    n: int = Field(ge=0, le=MAX_SAMPLES)
    loss: float | None = Field(default=None, ge=0, le=MAX_LOSS)
    auc: float | None = Field(default=None, ge=0, le=1)


class UnitSpend(SiteMessage):
    """The ε a site has spent on a job in one unit (per patient record, or per site), and the σ of the mechanism
    behind it: DP-SGD's for the record unit, the update-level noise's for the site unit."""

    unit: Unit
    epsilon: float | None = Field(ge=0, le=MAX_EPSILON)  # None: that mechanism ran without noise (no guarantee)
    noise_multiplier: float = Field(ge=0, le=1e4)
    # Secure aggregation, site unit: `epsilon` holds for the sum of at least the job's threshold of sites' noise;
    # this is what the site's own share of the noise guarantees alone, should every other site collude with the
    # aggregator (None: not a secure-aggregation release, or no noise).
    epsilon_alone: float | None = Field(default=None, ge=0, le=MAX_EPSILON)


class UpdateEnvelope(SiteMessage):
    """Metadata sent with an update (HTTP header); the body is the safetensors update with this sha256."""

    job_id: JobId
    round: int = Field(ge=1, le=MAX_ROUND)
    site: SiteName
    num_samples: int = Field(ge=1, le=MAX_SAMPLES)
    sha256: Sha256
    # Metrics of the global model this round started from (model version round-1), on local validation;
    # None when the site's policy lets no metric leave.
    evaluation: EvalMetrics | None
    train_loss: float = Field(ge=0, le=MAX_LOSS)
    # ε spent on this job so far, this round included, in the job's unit (`spec.privacy.unit`); None when the job
    # runs without noise (no guarantee).
    epsilon: float | None = Field(ge=0, le=MAX_EPSILON)
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


class EvaluationReport(SiteMessage):
    job_id: JobId
    round: int = Field(ge=0, le=MAX_ROUND)
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
