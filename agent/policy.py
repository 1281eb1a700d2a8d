"""The site policy: what this hospital allows, as one declarative file. Anything not allowed is denied.

`SitePolicy` is the schema (exported to `policies/schema.json`); `evaluate` checks a job against it and
returns every reason to refuse, never just the first, so a privacy officer sees the whole picture.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from agent.compute_policy import ComputePolicy, time_refusals, work_refusals
from agent.data import DataError, SiteData
from agent.fedml_adapter import TrainerRegistration, trainer_refusals
from agent.privacy_policy import BudgetPolicy, PerUnit, PrivacyPolicy, SitePrivacy, per_unit, privacy_refusals
from federation.jobs import UNIT_WORDS, JobSpec
from federation.models import count_parameters
from federation.schema import Frozen
from federation.yamlfile import validate_file

__all__ = ["BudgetPolicy", "ComputePolicy", "DatasetPolicy", "Decision", "PrivacyPolicy", "SitePolicy", "describe",
           "evaluate"]

# Metrics the agent knows how to compute as aggregates over its validation records. Nothing else can be
# requested as a metric, whatever a policy lists.
AGGREGATE_METRICS = frozenset({"auc", "loss", "train_loss", "n"})
Endpoint = Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")]


class DatasetPolicy(Frozen):
    """A dataset this site offers: where it is, which columns may be read, for which purposes."""

    path: Path = Field(description="CSV file; relative paths are resolved against the policy file's folder")
    format: Literal["csv"] = "csv"
    allowed_columns: list[str] = Field(min_length=1, description="Feature columns a job may use")
    target: str = Field(description="The only column a job may use as its target")
    min_cohort: int = Field(default=50, ge=1, description="Fewest records a job may train on: the training split "
                                                          "alone, after the job's validation rows are held out")
    max_validation_fraction: float = Field(default=0.5, gt=0, le=0.5,
                                           description="Largest share of the records a job may hold out for "
                                                       "validation (jobs allow at most 0.5)")
    allowed_purposes: list[str] = Field(min_length=1)


class EgressPolicy(Frozen):
    allowed_endpoints: list[Endpoint] = Field(min_length=1, description="host:port the agent may send to")
    max_upload_bytes_per_round: int = Field(default=16 * 1024 * 1024, ge=1)
    allowed_metrics: list[str] = Field(default_factory=lambda: ["auc", "loss", "n"])
    min_records_per_metric: int = Field(default=20, ge=1, description="No metric leaves over fewer records")
    share_tracking: bool = Field(default=True, description="Per-site metrics may feed experiment tracking")

    @field_validator("allowed_metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - AGGREGATE_METRICS)
        if unknown:
            raise ValueError(f"not aggregate metrics: {unknown}; choose from {sorted(AGGREGATE_METRICS)}")
        return v


class ModelPolicy(Frozen):
    allowed: list[str] = Field(min_length=1, description="Registered model names")
    max_parameters: int = Field(default=1_000_000, ge=1)


class TrainingWindow(Frozen):
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]]
    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="HH:MM, UTC")
    end: str = Field(pattern=r"^([01][0-9]|2[0-4]):[0-5][0-9]$", description="HH:MM, UTC")


class OperationsPolicy(Frozen):
    max_concurrent_jobs: int = Field(default=1, ge=1)
    training_windows: list[TrainingWindow] | None = Field(default=None, description="None: any time")


class SitePolicy(Frozen):
    """One hospital's rules for federated jobs. Default-deny: only what is listed here is allowed."""

    site: str
    datasets: dict[str, DatasetPolicy]
    privacy: PrivacyPolicy
    egress: EgressPolicy
    models: ModelPolicy
    operations: OperationsPolicy = OperationsPolicy()
    compute: ComputePolicy = Field(default_factory=ComputePolicy,
                                   description="What one job may cost this site per round, checked before accepting")
    trainers: dict[str, TrainerRegistration] = Field(
        default_factory=dict, description="Local trainers installed on this site (e.g. FedML ClientTrainers) that a "
                                          "job may name; pinned by the sha256 of their source. Empty: none")

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a policy file: duplicate keys refused, strict types (`min_cohort: true` is not 1); any problem
        raises `ConfigFileError`, one line naming the file and line."""
        policy = validate_file(cls, path, "site policy", strict=True)
        datasets = {
            name: ds.model_copy(update={"path": (path.parent / ds.path).resolve()}) if not ds.path.is_absolute() else ds
            for name, ds in policy.datasets.items()
        }
        return policy.model_copy(update={"datasets": datasets})


@dataclass
class Decision:
    unit: str = "site"  # the job's unit: `epsilon_*` are in it
    reasons: list[str] = field(default_factory=list)
    planned: dict[str, float] = field(default_factory=dict)  # ε the job may spend here, per unit it is charged in
    before: dict[str, float] = field(default_factory=dict)  # ε spent or reserved on the dataset, per unit
    plan: SitePrivacy | None = None

    @property
    def accepted(self) -> bool:
        return not self.reasons

    @property
    def epsilon_planned(self) -> float | None:
        return self.planned.get(self.unit)

    @property
    def epsilon_before(self) -> float:
        return self.before.get(self.unit, 0.0)

    @property
    def epsilon_after(self) -> float:
        return self.epsilon_before + (self.epsilon_planned or 0.0)

    def after(self) -> dict[str, float]:
        return {u: self.before.get(u, 0.0) + e for u, e in self.planned.items()}


def endpoint_of(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


DataLoader = Callable[[DatasetPolicy, JobSpec], SiteData]


def evaluate(
    policy: SitePolicy, spec: JobSpec, site: str, *, endpoints: list[str], spent: dict[str, float],
    active_jobs: int, load: DataLoader, now: dt.datetime | None = None,
) -> tuple[Decision, SiteData | None]:
    """Every reason `spec` is not allowed here, and the site's data when it may be read.

    `spent` is the ε already spent or reserved on the job's dataset, per unit. Data is read (only the allowed
    columns) only once every check the spec alone decides has passed (dataset, purpose, columns, model size, round
    time), since the cohort size, the work per round and the record-level plan depend on it.
    """
    d = Decision(unit=spec.privacy.unit, before=dict(spent))
    r = d.reasons
    if site not in spec.sites:
        r.append(f"the job does not list this site ({site})")
    ds = policy.datasets.get(spec.dataset.name)
    data: SiteData | None = None
    if ds is None:
        r.append(f"dataset {spec.dataset.name!r} is not offered by this site's policy")
    else:
        if spec.purpose not in ds.allowed_purposes:
            r.append(f"purpose {spec.purpose!r} is not allowed for {spec.dataset.name!r} "
                     f"(allowed: {', '.join(ds.allowed_purposes)})")
        extra = [c for c in spec.features.columns() if c not in ds.allowed_columns]
        if extra:
            r.append(f"column(s) not allowed: {extra}")
        if spec.features.target.column != ds.target:
            r.append(f"target {spec.features.target.column!r} is not the allowed target {ds.target!r}")
        if spec.dataset.validation_fraction > ds.max_validation_fraction:
            r.append(f"validation_fraction {spec.dataset.validation_fraction:g} is above this site's maximum "
                     f"{ds.max_validation_fraction:g} for {spec.dataset.name!r}")
    r.extend(_model_refusals(policy, spec))  # from the spec alone: nothing is built, and no data is read for it
    r.extend(time_refusals(policy.compute, spec))
    if ds is not None and not r:
        try:
            data = load(ds, spec)
        except DataError as exc:
            r.append(str(exc))
        else:
            if data.n_train < ds.min_cohort:
                r.append(f"the job would train on {data.n_train} records ({data.n_val} of "
                         f"{data.n_train + data.n_val} held out by validation_fraction "
                         f"{spec.dataset.validation_fraction:g}), below this site's minimum cohort of "
                         f"{ds.min_cohort} training records")
            r.extend(work_refusals(policy.compute, spec, data.n_train))
    refusals, d.plan = privacy_refusals(spec, policy.privacy, data.n_train if data is not None else None, spent,
                                        spec.dataset.name)
    r.extend(refusals)
    if d.plan is not None:
        d.planned = d.plan.epsilon(spec.rounds)
    for endpoint in endpoints:
        if endpoint not in policy.egress.allowed_endpoints:
            r.append(f"endpoint {endpoint} is not on the egress allowlist")
    bad_metrics = [m for m in spec.metrics if m not in policy.egress.allowed_metrics]
    if bad_metrics:
        r.append(f"metric(s) not allowed to leave: {bad_metrics} "
                 f"(allowed: {', '.join(policy.egress.allowed_metrics)})")
    r.extend(trainer_refusals(policy.trainers, spec))
    if active_jobs >= policy.operations.max_concurrent_jobs:
        r.append(f"already running {active_jobs} job(s); this site allows {policy.operations.max_concurrent_jobs}")
    if not in_training_window(policy.operations, now or dt.datetime.now(dt.UTC)):
        r.append("outside this site's training windows")
    return d, (data if d.accepted else None)


def _model_refusals(policy: SitePolicy, spec: JobSpec) -> list[str]:
    if spec.model.name not in policy.models.allowed:
        return [f"model {spec.model.name!r} is not allowed (allowed: {', '.join(policy.models.allowed)})"]
    r = []
    n = count_parameters(spec.model.name, spec.features.input_dim(), spec.model.hidden)  # arithmetic, nothing built
    if n > policy.models.max_parameters:
        r.append(f"model has {n} parameters, above this site's maximum {policy.models.max_parameters}")
    # A secure job's update is masked integers mod 2^32, carried as int64 (`agent.privacy`): 8 bytes a parameter.
    width, kind = (8, "masked int64") if spec.secure_aggregation is not None else (4, "float32")
    if n * width + 1024 > policy.egress.max_upload_bytes_per_round:
        r.append(f"an update of {n} {kind} parameters exceeds the upload limit "
                 f"{policy.egress.max_upload_bytes_per_round} bytes per round")
    return r


def in_training_window(ops: OperationsPolicy, now: dt.datetime) -> bool:
    if not ops.training_windows:
        return True
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[now.weekday()]
    hhmm = now.strftime("%H:%M")
    return any(day in w.days and w.start <= hhmm < w.end for w in ops.training_windows)


def describe(policy: SitePolicy) -> list[str]:
    """The policy in plain words, for `fedsilo policy check`."""
    out = [f"Site {policy.site} allows only what follows; everything else is refused."]
    for name, ds in policy.datasets.items():
        out.append(f"Dataset {name!r}: {ds.path} ({ds.format}); columns {', '.join(ds.allowed_columns)}; target "
                   f"{ds.target!r}; at least {ds.min_cohort} training records, at most "
                   f"{ds.max_validation_fraction:g} held out for validation; "
                   f"purposes: {', '.join(ds.allowed_purposes)}.")
    pp = policy.privacy
    units = ", ".join(f"{u} ({UNIT_WORDS[u]})" for u in pp.allowed_units)
    required = f"; always applies {', '.join(pp.required_units)}-level DP too" if pp.required_units else ""
    out.append(f"Privacy units: {units}{required}. Every update clipped to norm ≤ {pp.max_clip_norm}.")
    for unit in pp.allowed_units:
        floor = (f"update noise multiplier ≥ {pp.min_noise_multiplier}" if unit == "site" else
                 f"DP-SGD noise multiplier ≥ {pp.min_record_noise_multiplier}, per-example clip ≤ "
                 f"{pp.max_record_clip_norm}")
        out.append(f"  {unit} unit ({UNIT_WORDS[unit]}): {floor}; ε ≤ {_limit(pp.max_epsilon_per_job, unit)} per job.")
    for name, b in pp.budgets.items():
        period = f"every {b.reset_period_days} days" if b.reset_period_days else "never resets"
        totals = "; ".join(f"ε {_limit(b.epsilon, u)} {UNIT_WORDS[u]}" for u in pp.allowed_units)
        out.append(f"Budget for {name!r}: {totals}, in total at δ ≤ {b.delta:g} ({period}).")
    e = policy.egress
    out.append(f"Egress: only to {', '.join(e.allowed_endpoints)}; at most {e.max_upload_bytes_per_round} bytes "
               f"per round; metrics {', '.join(e.allowed_metrics)} over at least {e.min_records_per_metric} records; "
               f"tracking {'shared' if e.share_tracking else 'not shared'}.")
    out.append(f"Models: {', '.join(policy.models.allowed)} with at most {policy.models.max_parameters} parameters.")
    ops = policy.operations
    windows = "any time" if not ops.training_windows else "; ".join(
        f"{','.join(w.days)} {w.start}-{w.end} UTC" for w in ops.training_windows)
    out.append(f"Operations: at most {ops.max_concurrent_jobs} concurrent job(s); training {windows}.")
    c = policy.compute
    out.append(f"Compute per round: at most {c.max_local_steps_per_round} optimizer steps, {c.max_examples_per_round} "
               f"training examples and {c.max_round_seconds:g} s.")
    for name, t in policy.trainers.items():
        out.append(f"Trainer {name!r}: {t.import_path} (source sha256 {t.source_sha256[:12]}…), for models "
                   f"{', '.join(t.models)} on {', '.join(t.datasets)}.")
    return out


def _limit(value: PerUnit, unit: str) -> str:
    v = per_unit(value, unit)
    return "none (refused)" if v is None else f"{v:g}"


def policy_json_schema() -> str:
    import json

    schema = SitePolicy.model_json_schema()
    schema["$id"] = "https://fedsilo.example/schemas/site-policy.json"
    schema["title"] = "fedsilo site policy"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
