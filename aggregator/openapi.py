"""The OpenAPI 3.1 document of the aggregator's REST API, served at `/openapi.json`.

Request bodies come from the pydantic models the handlers validate with (`JobSpec`, `EvaluationReport`,
`UpdateEnvelope`); the response models below describe what the handlers return, so clients (the console,
scripts, schemathesis) and people can rely on one description. `tests/api/test_openapi.py` checks that every
registered route is documented here.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from federation.jobs import JobSpec
from federation.messages import ENVELOPE_HEADER, EvalMetrics, EvaluationReport, UpdateEnvelope
from federation.secagg.messages import MAX_WAIT_S, MaskRoster, Reveal, ShareBundle, UnmaskRequest, UnmaskWork

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every refusal: a stable code, a sentence, and for invalid jobs every bad field."""

    error: str
    detail: str
    errors: list[dict[str, str]] | None = None


class JobCreated(BaseModel):
    job_id: str
    state: Literal["offered"]


class JobListItem(BaseModel):
    job_id: str
    name: str
    state: str = Field(description="offered | running | finished | failed | cancelled")
    round: int
    rounds: int
    reason: str
    created_at: float
    updated_at: float
    paused: bool
    min_sites: int
    quorum: float
    sites: list[str]
    round_deadline_s: float
    deadline: float | None = Field(description="epoch seconds at which the open round closes; null if none is open")


class SiteAnswer(BaseModel):
    decision: str = Field(description="offered | accepted | refused | stopped")
    reasons: list[str]
    epsilon: float | None


class RoundHistory(BaseModel):
    """Global model version `round`, as evaluated by the sites on their own validation splits."""

    round: int
    complete: bool
    sites_reporting: int | None
    sites_evaluated: int = Field(description="sites whose metrics of this model version are in")
    samples: int | None
    train_loss: float | None
    duration_s: float | None
    global_: EvalMetrics | None = Field(alias="global")
    sites: dict[str, EvalMetrics] = Field(description="each site's metrics; empty with `?sites=none`")


class RejectionRow(BaseModel):
    id: int
    job_id: str | None
    round: int | None
    site: str | None
    reason: str
    detail: str
    at: float


class QuarantineRow(BaseModel):
    """A stored row moved aside at start-up: its table, key and why (the row itself is not served)."""

    id: int
    table_name: str
    job_id: str | None
    row_key: str
    reason: str
    at: float


class JobSummary(BaseModel):
    job_id: str
    name: str
    state: str
    paused: bool
    reason: str
    requester: str
    round: int
    rounds: int
    min_sites: int
    model_sha256: str
    created_at: float
    updated_at: float
    decisions: dict[str, int] = Field(description="how many sites gave each answer (offered, accepted, ...)")
    epsilon_max: float | None = Field(description="the largest ε a site reported in this job")
    report: Literal["pending", "written"] | None = Field(
        description="once the job ended: whether its report is written yet (null while it runs)")
    sites: dict[str, SiteAnswer] | None = Field(None, description="each site's answer; absent with `?sites=none`")
    history: list[RoundHistory]
    training: list[dict[str, Any]] | None = Field(
        None, description="per training round, what each site reported with its update; absent with `?sites=none`")
    rejections: list[RejectionRow]
    spec: dict[str, Any] = Field(description="the submitted JobSpec")


class JobControl(BaseModel):
    job_id: str
    state: Literal["cancelled"] | None = None
    paused: bool | None = None


class AuditHeadRow(BaseModel):
    """The latest head of a site's audit chain the aggregator received: give `sha256` (or `seq:sha256`) to
    `fedsilo audit verify --aggregator-head` at the site."""

    site: str
    seq: int = Field(description="entries in the site's audit chain when it sent this head")
    sha256: str = Field(description="hash of the chain's last entry")
    at: float = Field(description="when the aggregator received it, epoch seconds")
    conflicts: int = Field(description="heads received for an already-recorded entry with another hash")


class SiteRow(BaseModel):
    """A site as last heard of; further keys carry whatever the site's status reported."""

    model_config = ConfigDict(extra="allow")
    site: str
    state: str = Field(description="online | offline")
    at: float = Field(description="last seen, epoch seconds")


class SiteDecisionRow(BaseModel):
    job_id: str
    site: str
    decision: str
    reasons: list[str]
    epsilon_planned: float | None
    epsilon_spent: float | None
    epsilon_unit: Literal["site", "record"] = Field(
        description="unit of both ε: record (per patient record) or site (per hospital dataset)")
    at: float
    job_state: str


class Me(BaseModel):
    name: str
    role: Literal["viewer", "admin"]


class Health(BaseModel):
    status: Literal["ok"]


class UploadAck(BaseModel):
    model_config = ConfigDict(extra="allow")


_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (JobSpec, "validation"), (EvaluationReport, "validation"), (UpdateEnvelope, "validation"),
    (ErrorBody, "serialization"), (JobCreated, "serialization"), (JobListItem, "serialization"),
    (JobSummary, "serialization"), (JobControl, "serialization"), (SiteRow, "serialization"),
    (QuarantineRow, "serialization"), (AuditHeadRow, "serialization"),
    (SiteDecisionRow, "serialization"), (RejectionRow, "serialization"), (Me, "serialization"),
    (Health, "serialization"), (UploadAck, "serialization"), (ShareBundle, "validation"), (Reveal, "validation"),
    (MaskRoster, "serialization"), (UnmaskRequest, "serialization"), (UnmaskWork, "serialization"),
]
OPERATOR: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"operatorCertificate": []}]
SITE: list[dict[str, list[str]]] = [{"siteCertificate": []}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "invalid request", 401: "no identity", 403: "wrong role", 404: "not found",
            409: "not possible in the job's state", 413: "body too large",
            503: "retry: the job's writer is changing or resuming its round, or storage is unavailable"}
    return {str(c): _json(_ref(ErrorBody), text[c]) for c in codes}


def _op(summary: str, responses: dict[str, Any], *, security: list[dict[str, list[str]]] | None = None,
        parameters: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None, tag: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses,
                          "security": security if security is not None else []}
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    return op


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


JOB_ID = _path("job_id", {"type": "string", "minLength": 1})
ROUND = _path("round", {"type": "integer", "minimum": 0})
CONTROL_ERRORS = (401, 403, 409)


def _paths() -> dict[str, Any]:
    job_text = {"type": "string", "description": "the JobSpec as YAML"}
    control = {
        action: {"post": _op(f"{action.capitalize()} a job (admin)", {
            "200": _json(_ref(JobControl), f"the job is {action}d"), **_errors(*CONTROL_ERRORS)},
            security=OPERATOR, parameters=[JOB_ID], tag="jobs")}
        for action in ("cancel", "pause", "resume")
    }
    return {
        "/api/v1/jobs": {
            "post": _op("Submit a job (admin)", {"201": _json(_ref(JobCreated), "stored and offered to its sites"),
                                                 **_errors(400, 401, 403)},
                        security=OPERATOR, tag="jobs", body={"required": True, "content": {
                            "application/json": {"schema": _ref(JobSpec)},
                            "application/yaml": {"schema": job_text}}}),
            "get": _op("List jobs", {"200": _json({"type": "array", "items": _ref(JobListItem)}, "all jobs"),
                                     **_errors(401, 403)}, security=OPERATOR, tag="jobs"),
        },
        "/api/v1/jobs/{job_id}": {"get": _op(
            "A job's summary: decisions, per-round global and per-site metrics, rejections",
            {"200": _json(_ref(JobSummary), "the summary"), **_errors(401, 403, 404)},
            security=OPERATOR, tag="jobs", parameters=[JOB_ID, {
                "name": "sites", "in": "query", "required": False,
                "description": "`none`: leave each site's detail out (a status poll of a large federation)",
                "schema": {"type": "string", "enum": ["all", "none"], "default": "all"}}])},
        **{f"/api/v1/jobs/{{job_id}}/{action}": ops for action, ops in control.items()},
        "/api/v1/jobs/{job_id}/model": {"get": _op(
            "The job's current global model (safetensors)",
            {"200": {"description": "the model", "content": {"application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
             **_errors(401, 403, 404)},
            security=OPERATOR, parameters=[JOB_ID], tag="jobs")},
        "/api/v1/sites": {"get": _op(
            "Sites, online or offline, with their last status",
            {"200": _json({"type": "array", "items": _ref(SiteRow)}, "every site heard of"), **_errors(401, 403)},
            security=OPERATOR, tag="sites")},
        "/api/v1/sites/{site}/audit-head": {"get": _op(
            "The latest audit-chain head received from a site",
            {"200": _json(_ref(AuditHeadRow), "the head"), **_errors(401, 403, 404)},
            security=OPERATOR, tag="sites", parameters=[_path("site", {"type": "string"})])},
        "/api/v1/quarantine": {"get": _op(
            "Stored rows that failed their checks at start-up and were moved aside",
            {"200": _json({"type": "array", "items": _ref(QuarantineRow)}, "newest first"), **_errors(401, 403)},
            security=OPERATOR, tag="sites")},
        "/api/v1/decisions": {"get": _op(
            "Each site's answer to each job offered to it",
            {"200": _json({"type": "array", "items": _ref(SiteDecisionRow)}, "newest first"), **_errors(401, 403)},
            security=OPERATOR, tag="sites",
            parameters=[{"name": "site", "in": "query", "required": False, "schema": {"type": "string"}}])},
        "/api/v1/rejections": {"get": _op(
            "Refused uploads with their reasons (newest first, at most 1000)",
            {"200": _json({"type": "array", "items": _ref(RejectionRow)}, "rejections"), **_errors(401, 403)},
            security=OPERATOR, tag="jobs",
            parameters=[{"name": "job_id", "in": "query", "required": False, "schema": {"type": "string"}}])},
        "/api/v1/me": {"get": _op("The caller's operator identity and role",
                                  {"200": _json(_ref(Me), "who you are"), **_errors(401, 403)},
                                  security=OPERATOR, tag="operators")},
        "/api/v1/blobs/{sha}": {"get": _op(
            "A global model by its sha256 (sites only)",
            {"200": {"description": "the model", "content": {"application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
             **_errors(401, 403, 404)},
            security=SITE, parameters=[_path("sha", {"type": "string"})], tag="sites")},
        "/api/v1/jobs/{job_id}/rounds/{round}/update": {"post": _op(
            "Upload a site's privatized update (safetensors body, envelope in a header)",
            {"200": _json(_ref(UploadAck), "stored durably"), **_errors(400, 401, 403, 404, 409, 413, 503)},
            security=SITE, tag="sites",
            parameters=[JOB_ID, ROUND, {"name": ENVELOPE_HEADER, "in": "header", "required": True,
                                        "description": "the UpdateEnvelope as JSON",
                                        "schema": {"type": "string"}}],
            body={"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}})},
        "/api/v1/jobs/{job_id}/rounds/{round}/evaluation": {"post": _op(
            "Upload a site's evaluation of a global model",
            {"200": _json(_ref(UploadAck), "recorded"), **_errors(400, 401, 403, 404, 409, 503)},
            security=SITE, tag="sites", parameters=[JOB_ID, ROUND],
            body={"required": True, "content": {"application/json": {"schema": _ref(EvaluationReport)}}})},
        **_secagg_paths(),
        "/healthz": {"get": _op("Liveness", {"200": _json(_ref(Health), "alive")}, tag="operations")},
        "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "text exposition format", "content": {
            "text/plain": {"schema": {"type": "string"}}}}}, tag="operations")},
        "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                                     tag="operations")},
    }


def _secagg_paths() -> dict[str, Any]:
    """Secure aggregation (`federation.secagg.messages`): a site's shares, the roster, the unmask work, its reveal."""
    base = "/api/v1/jobs/{job_id}/rounds/{round}/secagg"
    wait = {"name": "wait", "in": "query", "required": False, "description": f"seconds to wait for it (at most "
            f"{MAX_WAIT_S:g}); 202 when it is not ready by then", "schema": {"type": "number", "minimum": 0}}
    pending = _json({"type": "object", "properties": {"status": {"const": "pending"}}}, "not ready yet: ask again")
    signed = {"type": "object", "properties": {"message": _ref(MaskRoster), "signature": {"type": "string"}}}
    return {
        f"{base}/shares": {"post": _op(
            "Post this round's mask key and sealed shares (one per participant)",
            {"200": _json({"allOf": [_ref(UploadAck)], "properties": {"roster": {
                "type": "string", "description": "with `wait`: the signed roster (as GET …/roster serves it), once "
                "frozen within the wait"}}}, "stored durably"), **_errors(400, 401, 403, 404, 409, 503)},
            security=SITE, tag="sites", parameters=[JOB_ID, ROUND, {
                **wait, "description": f"seconds to wait, after storing the shares, for the round's roster (at "
                f"most {MAX_WAIT_S:g}); the answer carries it when it is frozen by then"}],
            body={"required": True, "content": {"application/json": {"schema": _ref(ShareBundle)}}})},
        f"{base}/roster": {"get": _op(
            "The round's roster (signed): the sites every upload is masked against",
            {"200": _json(signed, "the signed MaskRoster"), "202": pending, **_errors(401, 403, 404, 409, 503)},
            security=SITE, tag="sites", parameters=[JOB_ID, ROUND, wait])},
        f"{base}/unmask": {"get": _op(
            "The round's unmask request (signed) and the sealed shares addressed to the caller",
            {"200": _json(_ref(UnmaskWork), "the work"), "202": pending, **_errors(401, 403, 404, 409, 503)},
            security=SITE, tag="sites", parameters=[JOB_ID, ROUND, wait])},
        f"{base}/reveal": {"post": _op(
            "Post the opened shares the unmask request asked of the caller (409 late_update: the round was "
            "unmasked with other survivors' reveals already; not recorded as a rejection)",
            {"200": _json(_ref(UploadAck), "stored durably"), **_errors(400, 401, 403, 404, 409, 503)},
            security=SITE, tag="sites", parameters=[JOB_ID, ROUND],
            body={"required": True, "content": {"application/json": {"schema": _ref(Reveal)}}})},
    }


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once; it depends only on the code)."""
    _, defs = models_json_schema(_MODELS, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedsilo aggregator", "version": "1",
                 "description": "Operators submit and follow jobs; hospital sites fetch models and upload "
                                "privatized updates. Sites authenticate with client certificates issued by the "
                                "federation CA; operators with a bearer token or an operator certificate."},
        "paths": _paths(),
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "an operator token (`fedsilo operator token`), role viewer or admin"},
                "operatorCertificate": {"type": "mutualTLS", "description": "an operator certificate (admin)"},
                "siteCertificate": {"type": "mutualTLS", "description": "a site certificate (OU=site)"},
            },
        },
    }
