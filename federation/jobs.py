"""The job specification an operator submits: what to train, on which declared data, how privately."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from federation.calibration import MAX_NOISE_MULTIPLIER
from federation.models import registered_models
from federation.privacy import calibrate_noise, epsilon_for
from federation.schema import FeatureSchema, Frozen
from federation.yamlfile import validate_text

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9\-]{0,62}$")  # also an MQTT topic level and a file name: no wildcards
SiteName = Annotated[str, Field(pattern=SITE_NAME.pattern)]


class ModelRef(Frozen):
    """A registered model, by name. A job never carries code: both sides build it from the registry."""

    name: str
    hidden: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(default_factory=list, max_length=8)
    # The first global model: `seeded` (the registry's random initialization, from the job's seed), `zeros`, or
    # `prior`: zeros except the input weights given in `prior` (encoded input name → weight), e.g. published
    # coefficients. `zeros` and `prior` are data-independent, so they cost no privacy; under DP they keep a random
    # start from swamping a short job's few noised updates. Only for models without hidden layers, whose units an
    # all-zero start would tie.
    init: Literal["seeded", "zeros", "prior"] = "seeded"
    prior: dict[Annotated[str, Field(min_length=1, max_length=256)], float] | None = Field(
        default=None, max_length=10_000)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in registered_models():
            raise ValueError(f"model {name!r} is not registered; registered: {sorted(registered_models())}")
        return name

    @model_validator(mode="after")
    def _shape(self) -> ModelRef:
        if self.name == "logreg" and self.hidden:
            raise ValueError("logreg takes no hidden layers")
        if self.init != "seeded" and self.name != "logreg":
            # (`mlp` has a hidden layer even when `hidden` is empty: its default width.)
            raise ValueError(f"init: {self.init} would give every hidden unit the same weights forever; "
                             "use init: seeded (or model logreg)")
        if (self.init == "prior") != (self.prior is not None):
            raise ValueError("init: prior needs `prior` (input name → weight), and `prior` needs init: prior")
        if self.prior is not None and not all(math.isfinite(w) for w in self.prior.values()):
            raise ValueError("prior weights must be finite numbers")
        return self


class Hyperparameters(Frozen):
    epochs: int = Field(default=1, ge=1, le=1000)
    # Optional cap on optimizer steps per round; None trains `epochs` full passes.
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    learning_rate: float = Field(default=0.05, gt=0, le=10)
    batch_size: int = Field(default=32, ge=1, le=100_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    momentum: float = Field(default=0.0, ge=0, lt=1)


Unit = Literal["site", "record"]
UNIT_WORDS: dict[str, str] = {"site": "per site", "record": "per patient record"}


class PrivacySpec(Frozen):
    """The guarantee a job asks for, in one unit.

    `unit: site` (update-level DP): each site's round delta is clipped to `clip_norm` and noised with std σ·C;
    ε bounds what the updates reveal about a hospital's whole dataset. `target_epsilon` (instead of
    `noise_multiplier`) is resolved once for every site: `JobSpec` calibrates σ for the job's rounds.

    `unit: record` (per patient): local training is DP-SGD (Poisson sampling, per-example clipping to
    `record_clip_norm`, Gaussian noise), and the update is clipped to `clip_norm` so the aggregator can check it,
    without update-level noise. `target_epsilon` is then per patient and each site calibrates its own DP-SGD σ for
    its own record count (`agent.record_plan.record_plan`); or the job fixes `record_noise_multiplier` for all.
    `noise_multiplier` is the update-level σ that a site whose policy also requires the site unit adds on top
    (0: such sites refuse).

    `record_noise: distributed` (per patient, with secure aggregation) moves DP-SGD's noise from each site to the
    secure sum: every round each site computes its records' clipped gradients (full batch, no noise), scales their
    sum by `learning_rate / batch_size`, clips it to `clip_norm`, and adds only its share of discrete Gaussian noise
    whose total over the job's threshold of sites is `record_noise_multiplier` times one record's contribution. The
    aggregator sees only the noised sum: one gradient step of DP gradient descent over every site's records, with
    the noise of one central mechanism instead of one per site. `target_epsilon` is resolved to that σ once for the
    job's rounds; ε is the same for every site."""

    clip_norm: float = Field(gt=0, le=1e6)
    noise_multiplier: float = Field(default=0.0, ge=0, le=MAX_NOISE_MULTIPLIER)
    target_epsilon: float | None = Field(default=None, gt=0, le=1e4)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    # Noise-free training leaks the raw update: only allowed when the job says so in so many words.
    allow_no_noise: bool = False
    unit: Unit = "site"
    record_clip_norm: float | None = Field(default=None, gt=0, le=1e6)
    record_noise_multiplier: float | None = Field(default=None, gt=0, le=MAX_NOISE_MULTIPLIER)
    # With a per-patient target: the most DP-SGD noise a site may need to meet it. A site with too few records
    # (a high sampling rate, so little amplification) would need more and only add noise to the model: it refuses.
    max_record_noise_multiplier: float | None = Field(default=None, gt=0, le=MAX_NOISE_MULTIPLIER)
    # Where a per-patient job's noise is added: `local` (each site's DP-SGD carries all of it) or `distributed`
    # (each site adds its share to the secure sum; needs secure_aggregation).
    record_noise: Literal["local", "distributed"] = "local"

    @model_validator(mode="after")
    def _noise_explicit(self) -> PrivacySpec:
        if self.unit == "site":
            if self.noise_multiplier == 0 and not self.allow_no_noise:
                raise ValueError("noise_multiplier 0 disables privacy; set allow_no_noise: true to mean it")
            if any(v is not None for v in (self.record_clip_norm, self.record_noise_multiplier,
                                           self.max_record_noise_multiplier)) or self.record_noise != "local":
                raise ValueError("record_clip_norm, record_noise_multiplier, max_record_noise_multiplier and "
                                 "record_noise apply only with unit: record")
            return self
        if self.record_clip_norm is None:
            raise ValueError("unit: record needs record_clip_norm (DP-SGD's per-example clip)")
        if self.record_noise == "distributed":
            if self.record_noise_multiplier is None:
                raise ValueError("record_noise: distributed needs target_epsilon or record_noise_multiplier")
            if self.max_record_noise_multiplier is not None:
                raise ValueError("max_record_noise_multiplier bounds a site's own DP-SGD σ; with record_noise: "
                                 "distributed the σ is the job's, the same for every site")
            if self.allow_no_noise:
                raise ValueError("allow_no_noise applies to unit: site")
            return self
        if (self.record_noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("unit: record needs exactly one of target_epsilon (per patient; each site calibrates "
                             "its own DP-SGD noise) and record_noise_multiplier")
        if self.max_record_noise_multiplier is not None and self.target_epsilon is None:
            raise ValueError("max_record_noise_multiplier bounds the σ a site calibrates for target_epsilon")
        if self.allow_no_noise:
            raise ValueError("allow_no_noise applies to unit: site; a record-level job always runs DP-SGD")
        return self

    @property
    def unit_words(self) -> str:
        return UNIT_WORDS[self.unit]


class AggregationParams(Frozen):
    """Settings of the aggregation strategies; each strategy reads only its own."""

    # FedProx: μ/2·‖w − w_global‖² added to every site's local loss (Li et al., 2020).
    proximal_mu: float = Field(default=0.01, ge=0, le=100)
    # Trimmed mean: the fraction of values dropped at each end of every coordinate (Yin et al., 2018).
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)
    # Norm-bounded FedAvg: each update is clipped to this L2 norm on the server (None: the job's clip norm), and
    # no site's weight exceeds the round's median claimed sample count (Sun et al., 2019).
    norm_bound: float | None = Field(default=None, gt=0, le=1e6)


class SecureAggregation(Frozen):
    """Sites upload their updates masked (`federation.secagg`): the aggregator learns the sum of at least
    `threshold` sites' updates and nothing else. The site-unit noise is distributed: each site adds a share sized
    so that `threshold` sites' shares together carry the job's σ·C."""

    # Sites that must survive a round for it to be unmasked (None: more than half the sites, and at least
    # min_sites). Fewer fail the round and nothing is unmasked.
    threshold: int | None = Field(default=None, ge=2, le=1000)
    # How the sum weighs each site's update: `samples` (by its record count, as FedAvg does) or `uniform`. None:
    # samples for a per-patient job, uniform for a per-site one, whose noise is added after the weight (a weight
    # below 1 shrinks a site's update but not its noise share; uniform keeps the sum's noise at the job's σ·C).
    weighting: Literal["samples", "uniform"] | None = None


class DataRef(Frozen):
    """Which dataset the job asks each site for, by the name the sites register it under."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")]
    # At most half: the rest is what a site trains on, and what its policy's `min_cohort` counts. (A job holding out
    # 98% would train on a handful of records while the site's cohort check saw them all.)
    validation_fraction: float = Field(default=1 / 3, gt=0, le=0.5)
    split_seed: int = 42


class JobSpec(Frozen):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    purpose: Annotated[str, Field(min_length=1, max_length=256)] = "research"
    dataset: DataRef
    features: FeatureSchema
    model: ModelRef
    hyperparameters: Hyperparameters = Hyperparameters()
    privacy: PrivacySpec
    rounds: int = Field(ge=1, le=10_000)
    sites: list[SiteName] = Field(min_length=1, max_length=1000)
    min_sites: int = Field(ge=1)
    # A round closes as soon as this fraction of the participating sites (and at least min_sites) has reported,
    # without waiting for stragglers; otherwise at its deadline if min_sites reported, and the job fails if not.
    quorum: float = Field(default=1.0, gt=0, le=1)
    round_deadline_s: float = Field(default=120.0, gt=0, le=86_400)
    # How long sites have to accept the offer before the job starts with whoever accepted.
    accept_deadline_s: float = Field(default=60.0, gt=0, le=86_400)
    # How the aggregator combines a round's updates (`aggregator/strategies.py`); `fedprox` also adds a proximal
    # term to each site's local loss. `median`, `trimmed_mean` and `fedavg_normbound` resist a poisoned site.
    aggregation: Literal["fedavg", "fedprox", "median", "trimmed_mean", "fedavg_normbound"] = "fedavg"
    aggregation_params: AggregationParams = Field(default_factory=lambda: AggregationParams())
    # A local trainer each site registered under this name in its own policy (e.g. a FedML ClientTrainer); a job
    # names it and never carries its code. None: fedsilo's built-in trainer.
    trainer: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")] | None = None
    server_learning_rate: float = Field(default=1.0, gt=0, le=100)
    seed: int = 0
    # Aggregate metrics the job asks each site to report; each site's policy decides which may leave.
    metrics: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]] = Field(
        default_factory=lambda: ["auc", "loss"], max_length=32
    )
    tags: dict[str, str] = Field(default_factory=dict, max_length=64)
    # `true` (or {threshold: t}) to aggregate masked updates only (`SecureAggregation`); None: plain uploads.
    secure_aggregation: SecureAggregation | None = None

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _secagg_switch(cls, v: Any) -> Any:
        return {} if v is True else (None if v is False else v)

    @property
    def secagg_threshold(self) -> int:
        """The number of surviving sites a secure round needs (and its distributed noise is sized for)."""
        if self.secure_aggregation is None:
            return 0
        t = self.secure_aggregation.threshold
        return t if t is not None else min(len(self.sites), max(self.min_sites, len(self.sites) // 2 + 1, 2))

    @property
    def secagg_weighting(self) -> str:
        sa = self.secure_aggregation
        if sa is None or sa.weighting is not None:
            return sa.weighting if sa is not None and sa.weighting is not None else "uniform"
        if self.privacy.record_noise == "distributed":
            return "records"  # each site sends a gradient sum; the aggregator divides by all their records
        return "samples" if self.privacy.unit == "record" else "uniform"

    @model_validator(mode="before")
    @classmethod
    def _calibrate(cls, data: Any) -> Any:
        """Resolve a site-unit `privacy.target_epsilon` to a noise multiplier for this job's rounds, once,
        deterministically; the same for a per-patient target with the noise in the secure sum (one σ for every
        site). (A per-patient target with local DP-SGD: each site calibrates its own σ for its own records.)"""
        privacy = data.get("privacy") if isinstance(data, dict) else None
        if not isinstance(privacy, dict) or privacy.get("target_epsilon") is None:
            return data
        distributed = privacy.get("unit") == "record" and privacy.get("record_noise") == "distributed"
        field = "record_noise_multiplier" if distributed else "noise_multiplier"
        if privacy.get(field) is not None or (privacy.get("unit", "site") != "site" and not distributed):
            return data
        try:
            target, rounds = float(privacy["target_epsilon"]), int(data["rounds"])
            delta = float(privacy.get("delta", PrivacySpec.model_fields["delta"].default))
        except (KeyError, TypeError, ValueError):
            return data  # field validation reports what is wrong
        if target <= 0 or rounds < 1 or not 0 < delta < 1:
            return data
        return {**data, "privacy": {**privacy, field: calibrate_noise(target, rounds, delta)}}

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("a site is listed twice")
        if self.min_sites > len(self.sites):
            raise ValueError(f"min_sites {self.min_sites} exceeds the {len(self.sites)} sites listed")
        if self.model.prior is not None:
            unknown = sorted(set(self.model.prior) - set(self.features.encoded_names()))
            if unknown:
                raise ValueError(f"model.prior names inputs the features do not declare: {unknown}; inputs are "
                                 f"{self.features.encoded_names()}")
        if self.aggregation == "fedprox" and self.privacy.unit == "record":
            # Opacus clips per-sample gradients of the data loss; a proximal term is not per-sample.
            raise ValueError("fedprox is not available with record-level DP (privacy.unit: record)")
        if self.secure_aggregation is not None:
            self._check_secagg()
        p = self.privacy
        if p.record_noise == "distributed":
            self._check_distributed()
        if p.target_epsilon is not None and (p.unit == "site" or p.record_noise == "distributed"):
            field, sigma = (("noise_multiplier", p.noise_multiplier) if p.unit == "site"
                            else ("record_noise_multiplier", p.record_noise_multiplier or 0.0))
            eps = epsilon_for(sigma, self.rounds, p.delta)
            if eps > p.target_epsilon:
                raise ValueError(f"{field} {sigma:g} gives ε {eps:.3g} over {self.rounds} "
                                 f"rounds, above target_epsilon {p.target_epsilon:g}; omit it to calibrate")
        return self

    def _check_distributed(self) -> None:
        if self.secure_aggregation is None:
            raise ValueError("record_noise: distributed adds each site's share of the noise to the secure sum: it "
                             "needs secure_aggregation")
        if self.aggregation != "fedavg" or self.trainer is not None:
            raise ValueError("record_noise: distributed takes one gradient step of the built-in logistic or MLP "
                             "model per round: it needs aggregation fedavg and no registered trainer")
        hp = self.hyperparameters
        if hp.epochs != 1 or hp.max_steps is not None:
            raise ValueError("record_noise: distributed takes one gradient step over every record per round: "
                             "epochs and max_steps do not apply (use more rounds)")
        if hp.optimizer != "sgd" or hp.momentum or hp.weight_decay:
            raise ValueError("record_noise: distributed takes plain gradient steps: optimizer sgd, no momentum, "
                             "no weight decay")
        if self.secure_aggregation.weighting is not None:
            raise ValueError("record_noise: distributed sums the sites' gradients over all their records; "
                             "secure_aggregation.weighting does not apply")

    def _check_secagg(self) -> None:
        if self.aggregation in ("median", "trimmed_mean", "fedavg_normbound"):
            raise ValueError(f"aggregation {self.aggregation} needs every site's update, which secure aggregation "
                             "hides by design (the aggregator sees only their sum); use fedavg or fedprox")
        n, t = len(self.sites), self.secagg_threshold
        if n < 2:
            raise ValueError("secure aggregation needs at least 2 sites")
        if not n / 2 < t <= n:
            raise ValueError(f"secure_aggregation.threshold {t} must be more than half the {n} sites and at most "
                             f"{n}: a threshold of half or fewer would let two disjoint groups each unmask")
        if t < self.min_sites:
            raise ValueError(f"secure_aggregation.threshold {t} is below min_sites {self.min_sites}")

    @classmethod
    def from_yaml(cls, text: str, source: str = "job") -> JobSpec:
        """A job from YAML: duplicate keys refused; any problem raises `ConfigFileError` (a ValueError), one line
        naming `source` and the line."""
        return validate_text(cls, text, source, "job")
