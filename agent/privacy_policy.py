"""The privacy section of a site policy, and what it makes of a job: the site's privacy plan or every reason not.

A job asks for one unit (`privacy.unit`): `site` (update-level noise; ε per hospital dataset) or `record` (DP-SGD;
ε per patient record). The site's policy says which units it accepts (`allowed_units`) and which it applies to
every job whatever the job asks (`required_units`: with `[site]`, a record-level job gets update-level noise as
well, and both ε are accounted and reported). Floors, ceilings, per-job maxima and budgets are kept per unit; a
job is charged in every unit its mechanisms protect and must fit in each of those ledgers.

A secure-aggregation job (`spec.secure_aggregation`) quantizes every update (`quantization`) and, for the site unit,
adds this site's share of distributed discrete Gaussian noise: the ε charged is what holds for the sum of at least
the job's threshold of sites (`federation.secagg.accounting`); what the site's own share guarantees alone, should
every other site collude with the aggregator, is reported beside it (`epsilon_alone`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pydantic import Field, model_validator

from agent.record_plan import RecordPlan, record_plan
from federation.jobs import UNIT_WORDS, JobSpec, Unit
from federation.models import count_parameters
from federation.privacy import epsilon_for
from federation.schema import Frozen
from federation.secagg import accounting
from federation.secagg.errors import SecAggError
from federation.secagg.job import job_quantization
from federation.secagg.quantize import Quantization

# A number applies to every unit; a mapping gives each unit its own (a unit left out allows nothing).
PerUnit = float | dict[Unit, float]


def per_unit(value: PerUnit, unit: str) -> float | None:
    return value if isinstance(value, float | int) else value.get(unit)  # type: ignore[call-overload]


class BudgetPolicy(Frozen):
    epsilon: PerUnit = Field(description="Total ε this dataset may spend over all jobs (per period), per unit: a "
                                         "number for each unit alike, or {site: ..., record: ...}")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="Largest δ a job may use")
    reset_period_days: int | None = Field(default=None, ge=1, description="None: the budget never resets")


class PrivacyPolicy(Frozen):
    min_noise_multiplier: float = Field(ge=0, description="Site unit: update-level noise floor (σ)")
    max_clip_norm: float = Field(gt=0, description="Update clip ceiling (C), every unit: each update is clipped")
    min_record_noise_multiplier: float = Field(default=0.0, ge=0, description="Record unit: DP-SGD noise floor (σ)")
    max_record_clip_norm: float = Field(default=10.0, gt=0, description="Record unit: per-example clip ceiling")
    max_epsilon_per_job: PerUnit = Field(description="Most ε one job may spend, per unit (as for budgets)")
    budgets: dict[str, BudgetPolicy] = Field(description="Per dataset name")
    allowed_units: list[Unit] = Field(default=["site", "record"], min_length=1,
                                      description="Units a job may ask for: site (per hospital), record (per patient)")
    required_units: list[Unit] = Field(default_factory=list,
                                       description="Units this site protects in every job whatever the job asks")

    @model_validator(mode="after")
    def _positive(self) -> PrivacyPolicy:
        limits = [self.max_epsilon_per_job, *(b.epsilon for b in self.budgets.values())]
        for v in limits:
            values = [v] if isinstance(v, float | int) else list(v.values())
            if any(not x > 0 for x in values):
                raise ValueError("every ε maximum and budget must be positive")
        return self


@dataclass(frozen=True)
class SitePrivacy:
    """What this site applies to one job: the units it protects, DP-SGD's plan, the update-level σ, and for a
    secure-aggregation job the quantization (with the share of the noise this site adds)."""

    units: tuple[Unit, ...]
    record: RecordPlan | None
    update_noise: float  # σ of the update-level noise; 0 when the site unit is not applied
    clip_norm: float
    delta: float
    quantization: Quantization | None = None  # secure aggregation only
    distributed: bool = False  # per patient, noise only in the secure sum (`privacy.record_noise: distributed`)

    @property
    def adds_noise_share(self) -> bool:
        """Whether this site adds its share of the discrete Gaussian noise to its masked update."""
        return "site" in self.units or self.distributed

    def epsilon(self, rounds: int) -> dict[str, float]:
        """ε per unit after `rounds` released rounds (site unit of a secure job, and the record unit with
        distributed noise: for the sum of ≥ t sites)."""
        out: dict[str, float] = {}
        if self.record is not None:
            out["record"] = self.record.epsilon(rounds)
        if self.distributed and self.quantization is not None:
            out["record"] = accounting.secure_epsilons(self.quantization, rounds, self.delta)[0]
        if "site" in self.units:
            if self.quantization is not None:
                out["site"] = accounting.secure_epsilons(self.quantization, rounds, self.delta)[0]
            else:
                out["site"] = epsilon_for(self.update_noise, rounds, self.delta)
        return out

    def epsilon_alone(self, rounds: int) -> float | None:
        """Site unit of a secure job (or the record unit with distributed noise): ε of this site's own share of the
        noise alone after `rounds` rounds (what holds if every other site colluded with the aggregator). None
        otherwise."""
        if not self.adds_noise_share or self.quantization is None:
            return None
        return accounting.secure_epsilons(self.quantization, rounds, self.delta)[1]


def plan_privacy(spec: JobSpec, policy: PrivacyPolicy, n_train: int | None) -> SitePrivacy:
    """The site's plan for `spec` (raises ValueError when a record plan cannot be made: no data, no σ)."""
    p = spec.privacy
    units: tuple[Unit, ...] = tuple(u for u in ("record", "site") if u == p.unit or u in policy.required_units)
    record = None
    if p.record_noise == "distributed":
        if "site" in units:
            raise ValueError("this site requires update-level noise (the site unit) in every job; a job whose "
                             "per-patient noise is in the secure sum (record_noise: distributed) adds none")
        return SitePrivacy(units, None, 0.0, p.clip_norm, p.delta, secure_quantization(spec), distributed=True)
    if "record" in units and p.unit == "record":
        if n_train is None:
            raise ValueError("a record-level plan needs the site's number of training records")
        record = record_plan(spec, n_train)
    noise = p.noise_multiplier if "site" in units else 0.0
    return SitePrivacy(units, record, noise, p.clip_norm, p.delta, secure_quantization(spec))


def secure_quantization(spec: JobSpec) -> Quantization | None:
    """The quantization of a secure job's updates (None for a plain job): the job's, the same at every site and at
    the aggregator (`federation.secagg.job`), whichever units this site applies; a site adds its share of the noise
    (`Quantization.site_sigma`) only where it applies the site unit. Raises SecAggError when no scale keeps the sum
    from wrapping."""
    if spec.secure_aggregation is None:
        return None
    return job_quantization(spec, count_parameters(spec.model.name, spec.features.input_dim(), spec.model.hidden))


def privacy_refusals(
    spec: JobSpec, policy: PrivacyPolicy, n_train: int | None, committed: dict[str, float], dataset: str,
) -> tuple[list[str], SitePrivacy | None]:
    """Every privacy reason to refuse `spec`, and the site's plan when one could be made. `committed` is the ε
    already spent or reserved on the dataset, per unit. `n_train` is None until the data has passed its checks:
    the record unit's checks that need it are then left for the caller to run once it has the data."""
    p, r = spec.privacy, []
    if p.unit not in policy.allowed_units:
        r.append(f"privacy unit {p.unit!r} ({UNIT_WORDS[p.unit]}) is not allowed here (allowed: "
                 f"{', '.join(f'{u} ({UNIT_WORDS[u]})' for u in policy.allowed_units)})")
    if "record" in policy.required_units and p.unit != "record":
        r.append("this site requires record-level DP (DP-SGD, ε per patient record) in every job; this job is "
                 f"{p.unit}-level")
    site_noise = p.unit == "site" or "site" in policy.required_units
    if site_noise and p.noise_multiplier < policy.min_noise_multiplier:
        if p.unit == "record":
            r.append(f"this site requires update-level noise as well (the site unit) with σ ≥ "
                     f"{policy.min_noise_multiplier}; the job's noise_multiplier is {p.noise_multiplier:g}")
        elif p.target_epsilon is not None:
            floor_eps = epsilon_for(policy.min_noise_multiplier, spec.rounds, p.delta)
            r.append(f"target ε {p.target_epsilon:g} over {spec.rounds} rounds (δ {p.delta:g}) needs noise "
                     f"multiplier {p.noise_multiplier:.3f}, below this site's floor {policy.min_noise_multiplier} "
                     f"(which allows at most ε {floor_eps:.2f} for these rounds)")
        else:
            r.append(f"noise multiplier {p.noise_multiplier} is below this site's floor {policy.min_noise_multiplier}")
    if p.clip_norm > policy.max_clip_norm:
        r.append(f"clip norm {p.clip_norm} is above this site's ceiling {policy.max_clip_norm}")
    budget = policy.budgets.get(dataset)
    if budget is None:
        r.append(f"no privacy budget is set for dataset {dataset!r}")
    elif p.delta > budget.delta:
        r.append(f"δ {p.delta:g} is above this site's {budget.delta:g}")
    if p.unit == "record":
        if p.record_clip_norm is not None and p.record_clip_norm > policy.max_record_clip_norm:
            r.append(f"record clip norm {p.record_clip_norm} is above this site's ceiling "
                     f"{policy.max_record_clip_norm}")
        if n_train is None:
            return r, None
    try:
        plan = plan_privacy(spec, policy, n_train)
    except SecAggError as exc:
        return [*r, f"secure aggregation cannot be planned for this job: {exc}"], None
    except ValueError as exc:
        return [*r, f"no DP-SGD noise meets the job's per-patient target here: {exc}"], None
    r.extend(_record_refusals(spec, policy, plan))
    eps = plan.epsilon(spec.rounds)
    for unit, planned in eps.items():
        words = UNIT_WORDS[unit]
        detail = f" ({plan.record.describe()})" if unit == "record" and plan.record is not None else ""
        cap = per_unit(policy.max_epsilon_per_job, unit)
        if cap is None:
            r.append(f"this site's policy sets no per-job ε maximum {words}")
        elif planned > cap:
            r.append(f"projected ε {planned:.2f} {words} exceeds this site's per-job maximum {cap:g}{detail}")
        total = per_unit(budget.epsilon, unit) if budget is not None else None
        if budget is not None and total is None:
            r.append(f"no privacy budget {words} is set for dataset {dataset!r}")
        elif total is not None and committed.get(unit, 0.0) + planned > total:
            r.append(f"projected ε {planned:.2f} {words} exceeds the remaining budget "
                     f"{max(total - committed.get(unit, 0.0), 0):.2f} of {total:g} {words} for {dataset!r}{detail}")
    return r, plan


def _record_refusals(spec: JobSpec, policy: PrivacyPolicy, plan: SitePrivacy) -> list[str]:
    rp, p = plan.record, spec.privacy
    if plan.distributed and p.record_noise_multiplier is not None \
            and p.record_noise_multiplier < policy.min_record_noise_multiplier:
        return [f"the job's noise in the secure sum is σ {p.record_noise_multiplier:.3f} per patient record, below "
                f"this site's floor {policy.min_record_noise_multiplier:g}"]
    if rp is None:
        return []
    r = []
    numbers = (f"{rp.records} training records, sampling rate {rp.sampling_rate:.3f}, {rp.steps_per_round} steps a "
               f"round × {rp.rounds} rounds")
    needs = f"target ε {p.target_epsilon:g} per patient needs" if p.target_epsilon is not None else "the job sets"
    floor = policy.min_record_noise_multiplier
    if rp.noise_multiplier < floor:
        floor_eps = dataclasses.replace(rp, noise_multiplier=floor).epsilon()
        r.append(f"{needs} DP-SGD σ {rp.noise_multiplier:.3f} here ({numbers}), below this site's floor {floor:g} "
                 f"(which allows at most ε {floor_eps:.2f} per patient here)")
    ceiling = p.max_record_noise_multiplier
    if ceiling is not None and rp.noise_multiplier > ceiling:
        r.append(f"{needs} DP-SGD σ {rp.noise_multiplier:.2f} here ({numbers}), above the job's ceiling {ceiling:g}: "
                 f"this site has too few records for that target")
    return r
