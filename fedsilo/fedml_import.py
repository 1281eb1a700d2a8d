"""`fedsilo job import-fedml`: a FedML Octopus cross-silo config (`fedml_config.yaml`) as a fedsilo job.

Every field of the FedML file is accounted for: mapped to a job field, or ignored with the reason, so a team
moving over sees exactly what changes. What FedML's config cannot say (the feature schema, update-level DP, the
purpose) comes from a fedsilo job used as a template. Anything that looks like a secret (FedML configs often
carry a `wandb_key`) is never copied, and never printed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from federation.jobs import DataRef, JobSpec
from federation.models import registered_models
from federation.schema import field_errors

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "heart-disease.yaml"
SECRET = re.compile(r"key|secret|token|password", re.IGNORECASE)
# FedML's model names (its `model_hub`) that have a registered fedsilo counterpart.
MODEL_ALIASES = {"lr": "logreg", "logistic_regression": "logreg", "logreg": "logreg", "mlp": "mlp"}
OPTIMIZER_ALIASES = {"fedavg": "fedavg", "fedavg_seq": "fedavg", "fedprox": "fedprox"}
CLIENT_OPTIMIZERS = ("sgd", "adam")


class FedMLImportError(ValueError):
    """The FedML config cannot become a valid fedsilo job; the message says which field and why."""


class _Section(BaseModel):
    """A part of FedML's config: the fields fedsilo reads are typed; the rest is kept to be reported."""

    model_config = ConfigDict(extra="allow", frozen=True)


class FedMLCommonArgs(_Section):
    training_type: str = "cross_silo"
    random_seed: int = 0


class FedMLDataArgs(_Section):
    dataset: str


class FedMLModelArgs(_Section):
    model: str


class FedMLTrainArgs(_Section):
    federated_optimizer: str
    comm_round: int = Field(ge=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    client_optimizer: str
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    client_num_in_total: int = Field(ge=1)
    client_num_per_round: int = Field(ge=1)
    fedprox_mu: float | None = Field(default=None, ge=0)


class FedMLValidationArgs(_Section):
    frequency_of_the_test: int = Field(default=1, ge=1)


class FedMLTrackingArgs(_Section):
    sm_experiment_name: str | None = None


class FedMLCommArgs(_Section):
    backend: str = "MQTT_S3"


class FedMLConfig(_Section):
    """The sections of `fedml_config.yaml` the import reads."""

    common_args: FedMLCommonArgs = FedMLCommonArgs()
    data_args: FedMLDataArgs
    model_args: FedMLModelArgs
    train_args: FedMLTrainArgs
    validation_args: FedMLValidationArgs = FedMLValidationArgs()
    tracking_args: FedMLTrackingArgs = FedMLTrackingArgs()
    comm_args: FedMLCommArgs | None = None


Status = Literal["mapped", "ignored", "secret", "template"]


@dataclass(frozen=True)
class MappingLine:
    source: str  # the FedML field (dotted), or the fedsilo fields taken from the template
    status: Status
    detail: str

    def render(self) -> str:
        return f"{self.status:<8} {self.source:<40} {self.detail}"


@dataclass
class ImportResult:
    job: JobSpec
    lines: list[MappingLine] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def job_yaml(self, source: str) -> str:
        """The job as YAML: defaults left out, except the fields taken from FedML's config (shown explicitly)."""
        short = self.job.model_dump(mode="json", exclude_defaults=True)
        full = self.job.model_dump(mode="json", exclude_none=True)
        shown = {"hyperparameters", "aggregation", "quorum", "seed"}
        data = {k: full[k] if k in shown else short[k] for k in full if k in shown or k in short}
        body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        return f"# Converted from the FedML config {source} by `fedsilo job import-fedml`.\n{body}"


# Why each FedML field fedsilo does not take is not needed, by section (and by field where it differs).
IGNORED_SECTION = {
    "common_args": "fedsilo is cross-silo and horizontal by design; there is no mode to choose",
    "environment_args": "a job never ships code or a bootstrap script: each site installs its own software",
    "device_args": "agents train on CPU with the torch_threads of their own config; a job cannot choose devices",
    "data_args": "each site's policy decides which file and which columns a dataset name means; the data is "
                 "already partitioned by hospital",
    "model_args": "models are built from fedsilo's registry on both sides; no model file is exchanged",
    "train_args": "no fedsilo counterpart",
    "validation_args": "no fedsilo counterpart",
    "tracking_args": "tracking sinks (local report, SageMaker Experiments) are configured on the aggregator, "
                     "not in a job",
}
IGNORED_FIELD = {
    "common_args.config_version": "FedML's release channel; a site runs the fedsilo agent its operators installed",
    "common_args.using_mlops": "replaced by the aggregator's console, API, /metrics and tracking sinks",
    "train_args.client_id_list": "sites are named (--sites), not numbered FedML edge ids",
}
COMM_ARGS = ("replaced by fedsilo's transport: signed job offers and round tasks over MQTT (Mosquitto, mutual TLS, "
             "a per-site ACL), models and updates over HTTPS (mutual TLS) through each site's egress gate; no MQTT "
             "or S3 credentials are handed to sites")


def _secret_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key, at any depth, whose name looks like a credential."""
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if SECRET.search(str(k)):
                found.append(path)
            else:
                found += _secret_paths(v, path + ".")
    return found


def _show(value: Any) -> str:
    if value is None:
        return "(empty)"
    return value if isinstance(value, str) else json.dumps(value)


def _load(path: Path) -> tuple[dict[str, Any], FedMLConfig]:
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FedMLImportError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise FedMLImportError(f"{path}: a FedML config is a YAML mapping of sections (train_args, ...)")
    try:
        return raw, FedMLConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{field}: {msg}" for field, msg in field_errors(exc))
        raise FedMLImportError(f"{path} is not a FedML cross-silo config fedsilo can read: {problems}") from None


def _template(path: Path) -> JobSpec:
    try:
        return JobSpec.from_yaml(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedMLImportError(f"the template {path} is not a valid fedsilo job: {exc}") from None


def _model(name: str) -> str:
    mapped = MODEL_ALIASES.get(name.lower())
    if mapped is None or mapped not in registered_models():
        aliases = ", ".join(f"{k} → {v}" for k, v in MODEL_ALIASES.items() if v in registered_models())
        raise FedMLImportError(f"model_args.model {name!r} has no registered fedsilo model; registered models: "
                               f"{', '.join(sorted(registered_models()))} (FedML names accepted: {aliases})")
    return mapped


def import_fedml(path: Path, sites: list[str] | None = None, template: Path | None = None,
                 name: str | None = None, trainer: str | None = None) -> ImportResult:
    """Convert the FedML config at `path` into a validated `JobSpec`, with a line for every field.

    `trainer` names a trainer the sites registered in their policies (their own FedML `ClientTrainer`)."""
    raw, cfg = _load(path)
    base_path = template or DEFAULT_TEMPLATE
    base = _template(base_path)
    lines: list[MappingLine] = []
    warnings: list[str] = []
    taken: set[str] = set()

    def mapped(src: str, value: Any, detail: str) -> None:
        taken.add(src)
        lines.append(MappingLine(src, "mapped", f"{_show(value)} → {detail}"))

    def ignored(src: str, value: Any, why: str) -> None:
        taken.add(src)
        lines.append(MappingLine(src, "ignored", f"{_show(value)}: {why}"))

    ta, va, tr = cfg.train_args, cfg.validation_args, cfg.tracking_args

    # data_args → the dataset reference.
    dataset = cfg.data_args.dataset
    try:
        DataRef(name=dataset)
    except ValidationError:
        raise FedMLImportError(f"data_args.dataset {dataset!r} is not a fedsilo dataset name (lowercase letters, "
                               "digits, '-' and '_'): rename it to the name the sites' policies use") from None
    if dataset != base.dataset.name:
        raise FedMLImportError(f"data_args.dataset {dataset!r} is not the dataset of the template {base_path} "
                               f"({base.dataset.name!r}); give --template a fedsilo job whose features describe "
                               f"{dataset!r}")
    mapped("data_args.dataset", dataset, f"dataset.name: {dataset} (each site's policy still decides which file "
                                         "and columns this name means)")

    # model_args.model → a registered model.
    model = _model(cfg.model_args.model)
    hidden = list(base.model.hidden) if base.model.name == model else []
    mapped("model_args.model", cfg.model_args.model, f"model.name: {model}" + (f" (hidden {hidden} from the "
                                                                               "template)" if hidden else ""))

    # train_args.
    fed_opt = OPTIMIZER_ALIASES.get(ta.federated_optimizer.lower())
    if fed_opt is None:
        raise FedMLImportError(f"train_args.federated_optimizer {ta.federated_optimizer!r} has no fedsilo "
                               "counterpart; supported: FedAvg, FedProx (fedsilo also offers median, trimmed_mean "
                               "and fedavg_normbound: set aggregation in the job)")
    mapped("train_args.federated_optimizer", ta.federated_optimizer, f"aggregation: {fed_opt}")
    aggregation_params = base.aggregation_params
    if ta.fedprox_mu is not None:
        if fed_opt == "fedprox":
            aggregation_params = aggregation_params.model_copy(update={"proximal_mu": ta.fedprox_mu})
            mapped("train_args.fedprox_mu", ta.fedprox_mu, f"aggregation_params.proximal_mu: {ta.fedprox_mu}")
        else:
            ignored("train_args.fedprox_mu", ta.fedprox_mu, "only used by FedProx")
    mapped("train_args.comm_round", ta.comm_round, f"rounds: {ta.comm_round}")
    mapped("train_args.epochs", ta.epochs, f"hyperparameters.epochs: {ta.epochs}")
    mapped("train_args.batch_size", ta.batch_size, f"hyperparameters.batch_size: {ta.batch_size}")
    optimizer = ta.client_optimizer.lower()
    if optimizer not in CLIENT_OPTIMIZERS:
        raise FedMLImportError(f"train_args.client_optimizer {ta.client_optimizer!r} is not available; fedsilo's "
                               f"local optimizers: {', '.join(CLIENT_OPTIMIZERS)}")
    mapped("train_args.client_optimizer", ta.client_optimizer, f"hyperparameters.optimizer: {optimizer}")
    mapped("train_args.learning_rate", ta.learning_rate, f"hyperparameters.learning_rate: {ta.learning_rate}")
    mapped("train_args.weight_decay", ta.weight_decay, f"hyperparameters.weight_decay: {ta.weight_decay}")

    # client_num_in_total / client_num_per_round → sites, min_sites, quorum.
    total, per_round = ta.client_num_in_total, ta.client_num_per_round
    if per_round > total:
        raise FedMLImportError(f"train_args.client_num_per_round {per_round} exceeds client_num_in_total {total}")
    if not sites:
        sites = [f"site-{i}" for i in range(1, total + 1)]
        warnings.append(f"no --sites given: the job lists placeholders {', '.join(sites)}; replace them with the "
                        "names of the sites' certificates")
    elif len(sites) != total:
        warnings.append(f"train_args.client_num_in_total is {total} but {len(sites)} site(s) were given; the job "
                        f"lists the {len(sites)} given")
    min_sites = min(per_round, len(sites))
    quorum = round(min_sites / len(sites), 6)
    mapped("train_args.client_num_in_total", total, f"sites: {', '.join(sites)}")
    mapped("train_args.client_num_per_round", per_round,
           f"min_sites: {min_sites}, quorum: {quorum:g} (every site is asked each round; a round closes once "
           f"{min_sites} of {len(sites)} have reported, FedML samples {per_round} of {total} instead)")

    # validation_args.frequency_of_the_test.
    if "frequency_of_the_test" not in (raw.get("validation_args") or {}):
        pass
    elif va.frequency_of_the_test == 1:
        mapped("validation_args.frequency_of_the_test", 1,
               "every round: each site evaluates the global model on its validation split at every round")
    else:
        ignored("validation_args.frequency_of_the_test", va.frequency_of_the_test,
                "fedsilo evaluates the global model at every site every round (it costs no extra round trip)")

    # common_args.random_seed → seed.
    seed = base.seed
    if "random_seed" in (raw.get("common_args") or {}):
        seed = cfg.common_args.random_seed
        mapped("common_args.random_seed", cfg.common_args.random_seed, f"seed: {cfg.common_args.random_seed}")

    # tracking_args: the experiment name; secrets are handled below.
    tags = dict(base.tags)
    tags["imported_from"] = "fedml"
    if tr.sm_experiment_name is not None:
        tags["experiment"] = tr.sm_experiment_name
        mapped("tracking_args.sm_experiment_name", tr.sm_experiment_name,
               f"tags.experiment: {tr.sm_experiment_name} (the job's SageMaker Experiments prefix, in place of the "
               "aggregator's tracking experiment_prefix)")

    # comm_args: replaced as a whole.
    if "comm_args" in raw:
        backend = cfg.comm_args.backend if cfg.comm_args else "MQTT_S3"
        taken.update(f"comm_args.{k}" for k in (raw["comm_args"] or {}))
        taken.add("comm_args")
        lines.append(MappingLine("comm_args", "ignored", f"backend {backend}: {COMM_ARGS}"))

    # Secrets, anywhere in the file: never copied, never printed.
    for secret in _secret_paths(raw):
        taken.add(secret)
        lines.append(MappingLine(secret, "secret", "not copied into the job (its value is not shown)"))
        warnings.append(f"{path} holds what looks like a secret at {secret}: it was not copied; remove it from the "
                        "file and rotate it if the file was ever shared")

    # Everything else in the file: ignored, with the section's reason.
    for section, body in raw.items():
        if section in taken:
            continue
        if not isinstance(body, dict):
            lines.append(MappingLine(section, "ignored", f"{_show(body)}: not a FedML config section"))
            continue
        for key, value in body.items():
            src = f"{section}.{key}"
            if src in taken or any(s.startswith(src + ".") for s in taken):
                continue
            ignored(src, value, IGNORED_FIELD.get(src) or IGNORED_SECTION.get(section, "not a FedML cross-silo "
                                                                                      "section fedsilo reads"))

    job_name = name or f"{dataset}-{model}"
    data: dict[str, Any] = base.model_dump(mode="python")
    data.update(
        name=job_name, dataset={**data["dataset"], "name": dataset}, model={"name": model, "hidden": hidden},
        hyperparameters={"epochs": ta.epochs, "batch_size": ta.batch_size, "optimizer": optimizer,
                         "learning_rate": ta.learning_rate, "weight_decay": ta.weight_decay},
        rounds=ta.comm_round, sites=sites, min_sites=min_sites, quorum=quorum, aggregation=fed_opt,
        aggregation_params=aggregation_params.model_dump(), seed=seed, tags=tags, trainer=trainer,
    )
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{field}: {msg}" for field, msg in field_errors(exc))
        raise FedMLImportError(f"the converted job is not valid: {problems}") from None
    lines.append(MappingLine(
        "(template)", "template",
        f"purpose, features, privacy, deadlines and metrics from {base_path.name}: FedML's config has no feature "
        "schema, update-level DP or purpose; review them"))
    lines.insert(0, MappingLine("(name)", "template", f"name: {job_name} (FedML's config has no job name; --name)"))
    if trainer is not None:
        lines.append(MappingLine("(trainer)", "template", f"trainer: {trainer} (each site runs its own registered "
                                                          "trainer of that name: its FedML ClientTrainer)"))
    rank = {"mapped": 1, "ignored": 2, "secret": 3, "template": 4}
    lines.sort(key=lambda line: 0 if line.source == "(name)" else rank[line.status])
    return ImportResult(spec, lines, warnings)
