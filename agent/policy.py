"""The site policy: what this hospital allows, as one declarative file. Anything not allowed is denied.

`SitePolicy` is the schema (exported to `policies/schema.json`); `evaluate` checks a job against it and
returns every reason to refuse, never just the first, so a privacy officer sees the whole picture.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, field_validator

from agent.data import DataError, SiteData
from agent.fedml_adapter import TrainerRegistration, trainer_refusals
from agent.privacy import job_epsilon
from federation.jobs import JobSpec
from federation.models import count_parameters
from federation.privacy import epsilon_for
from federation.schema import Frozen

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
    min_cohort: int = Field(default=50, ge=1, description="Fewest records with a target a job may train on")
    allowed_purposes: list[str] = Field(min_length=1)


class BudgetPolicy(Frozen):
    epsilon: float = Field(gt=0, description="Total ε this dataset may spend over all jobs (per period)")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="Largest δ a job may use")
    reset_period_days: int | None = Field(default=None, ge=1, description="None: the budget never resets")


class PrivacyPolicy(Frozen):
    min_noise_multiplier: float = Field(ge=0, description="Update-level noise floor (σ)")
    max_clip_norm: float = Field(gt=0, description="Update-level clip ceiling (C)")
    max_epsilon_per_job: float = Field(gt=0)
    budgets: dict[str, BudgetPolicy] = Field(description="Per dataset name")
    allowed_units: list[Literal["site", "record"]] = Field(default=["site", "record"])


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
    trainers: dict[str, TrainerRegistration] = Field(
        default_factory=dict, description="Local trainers installed on this site (e.g. FedML ClientTrainers) that a "
                                          "job may name; pinned by the sha256 of their source. Empty: none")

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        data: Any = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a policy must be a YAML mapping")
        policy = cls.model_validate(data)
        datasets = {
            name: ds.model_copy(update={"path": (path.parent / ds.path).resolve()}) if not ds.path.is_absolute() else ds
            for name, ds in policy.datasets.items()
        }
        return policy.model_copy(update={"datasets": datasets})


@dataclass
class Decision:
    reasons: list[str] = field(default_factory=list)
    epsilon_planned: float | None = None
    epsilon_before: float = 0.0

    @property
    def accepted(self) -> bool:
        return not self.reasons

    @property
    def epsilon_after(self) -> float:
        return self.epsilon_before + (self.epsilon_planned or 0.0)


def endpoint_of(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


DataLoader = Callable[[DatasetPolicy, JobSpec], SiteData]


def evaluate(
    policy: SitePolicy, spec: JobSpec, site: str, *, endpoints: list[str], spent: float, active_jobs: int,
    load: DataLoader, now: dt.datetime | None = None,
) -> tuple[Decision, SiteData | None]:
    """Every reason `spec` is not allowed here, and the site's data when it may be read.

    `spent` is the ε already spent on the job's dataset. Data is read (only the allowed columns) only once
    the dataset, purpose and columns have passed, since the cohort size and record-level ε depend on it.
    """
    d = Decision(epsilon_before=spent)
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
        if not r:
            try:
                data = load(ds, spec)
            except DataError as exc:
                r.append(str(exc))
            else:
                if data.n_train + data.n_val < ds.min_cohort:
                    r.append(f"cohort of {data.n_train + data.n_val} records is below this site's minimum "
                             f"{ds.min_cohort}")
    p, pp = spec.privacy, policy.privacy
    if p.noise_multiplier < pp.min_noise_multiplier and p.target_epsilon is not None:
        floor_eps = epsilon_for(pp.min_noise_multiplier, spec.rounds, p.delta)
        r.append(f"target ε {p.target_epsilon:g} over {spec.rounds} rounds (δ {p.delta:g}) needs noise multiplier "
                 f"{p.noise_multiplier:.3f}, below this site's floor {pp.min_noise_multiplier} (which allows at most "
                 f"ε {floor_eps:.2f} for these rounds)")
    elif p.noise_multiplier < pp.min_noise_multiplier:
        r.append(f"noise multiplier {p.noise_multiplier} is below this site's floor {pp.min_noise_multiplier}")
    if p.clip_norm > pp.max_clip_norm:
        r.append(f"clip norm {p.clip_norm} is above this site's ceiling {pp.max_clip_norm}")
    if p.unit not in pp.allowed_units:
        r.append(f"privacy unit {p.unit!r} is not allowed (allowed: {', '.join(pp.allowed_units)})")
    budget = pp.budgets.get(spec.dataset.name)
    if budget is None:
        r.append(f"no privacy budget is set for dataset {spec.dataset.name!r}")
    elif p.delta > budget.delta:
        r.append(f"δ {p.delta:g} is above this site's {budget.delta:g}")
    if p.unit == "site" or data is not None:
        d.epsilon_planned = job_epsilon(spec, data.n_train if data is not None else None)
        if d.epsilon_planned > pp.max_epsilon_per_job:
            r.append(f"projected ε {d.epsilon_planned:.2f} exceeds this site's per-job maximum "
                     f"{pp.max_epsilon_per_job}")
        if budget is not None and spent + d.epsilon_planned > budget.epsilon:
            r.append(f"projected ε {d.epsilon_planned:.2f} exceeds the remaining budget "
                     f"{max(budget.epsilon - spent, 0):.2f} of {budget.epsilon} for {spec.dataset.name!r}")
    for endpoint in endpoints:
        if endpoint not in policy.egress.allowed_endpoints:
            r.append(f"endpoint {endpoint} is not on the egress allowlist")
    bad_metrics = [m for m in spec.metrics if m not in policy.egress.allowed_metrics]
    if bad_metrics:
        r.append(f"metric(s) not allowed to leave: {bad_metrics} "
                 f"(allowed: {', '.join(policy.egress.allowed_metrics)})")
    if spec.model.name not in policy.models.allowed:
        r.append(f"model {spec.model.name!r} is not allowed (allowed: {', '.join(policy.models.allowed)})")
    else:
        n = count_parameters(spec.model.name, spec.features.input_dim(), spec.model.hidden)  # nothing built
        if n > policy.models.max_parameters:
            r.append(f"model has {n} parameters, above this site's maximum {policy.models.max_parameters}")
        if n * 4 + 1024 > policy.egress.max_upload_bytes_per_round:
            r.append(f"an update of {n} float32 parameters exceeds the upload limit "
                     f"{policy.egress.max_upload_bytes_per_round} bytes per round")
    r.extend(trainer_refusals(policy.trainers, spec))
    if active_jobs >= policy.operations.max_concurrent_jobs:
        r.append(f"already running {active_jobs} job(s); this site allows {policy.operations.max_concurrent_jobs}")
    if not in_training_window(policy.operations, now or dt.datetime.now(dt.UTC)):
        r.append("outside this site's training windows")
    return d, (data if d.accepted else None)


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
                   f"{ds.target!r}; at least {ds.min_cohort} records; purposes: {', '.join(ds.allowed_purposes)}.")
    pp = policy.privacy
    out.append(f"Privacy: noise multiplier ≥ {pp.min_noise_multiplier}, clip norm ≤ {pp.max_clip_norm}, "
               f"ε ≤ {pp.max_epsilon_per_job} per job; units: {', '.join(pp.allowed_units)}.")
    for name, b in pp.budgets.items():
        period = f"every {b.reset_period_days} days" if b.reset_period_days else "never resets"
        out.append(f"Budget for {name!r}: ε {b.epsilon} in total at δ ≤ {b.delta:g} ({period}).")
    e = policy.egress
    out.append(f"Egress: only to {', '.join(e.allowed_endpoints)}; at most {e.max_upload_bytes_per_round} bytes "
               f"per round; metrics {', '.join(e.allowed_metrics)} over at least {e.min_records_per_metric} records; "
               f"tracking {'shared' if e.share_tracking else 'not shared'}.")
    out.append(f"Models: {', '.join(policy.models.allowed)} with at most {policy.models.max_parameters} parameters.")
    ops = policy.operations
    windows = "any time" if not ops.training_windows else "; ".join(
        f"{','.join(w.days)} {w.start}-{w.end} UTC" for w in ops.training_windows)
    out.append(f"Operations: at most {ops.max_concurrent_jobs} concurrent job(s); training {windows}.")
    for name, t in policy.trainers.items():
        out.append(f"Trainer {name!r}: {t.import_path} (source sha256 {t.source_sha256[:12]}…), for models "
                   f"{', '.join(t.models)} on {', '.join(t.datasets)}.")
    return out


def policy_json_schema() -> str:
    import json

    schema = SitePolicy.model_json_schema()
    schema["$id"] = "https://fedsilo.example/schemas/site-policy.json"
    schema["title"] = "fedsilo site policy"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
