"""`fedsilo job import-fedml`: the example FedML config, field by field, and every way an import is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from federation.jobs import JobSpec
from fedsilo.cli import main
from fedsilo.fedml_import import FedMLImportError, ImportResult, import_fedml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fedml_config.yaml"
SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]
WANDB_KEY = yaml.safe_load(EXAMPLE.read_text())["tracking_args"]["wandb_key"]


def statuses(result: ImportResult) -> dict[str, str]:
    return {line.source: line.status for line in result.lines}


def detail(result: ImportResult, source: str) -> str:
    return next(line.detail for line in result.lines if line.source == source)


def variant(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """The example config with some fields of some sections changed (a value of None deletes the field)."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    for section, changes in sections.items():
        body = cfg.setdefault(section, {})
        for key, value in changes.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
    path = tmp_path / "fedml_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_example_maps_field_by_field() -> None:
    result = import_fedml(EXAMPLE, SITES)
    job = result.job
    # train_args
    assert job.aggregation == "fedavg"
    assert job.rounds == 10
    hp = job.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.optimizer, hp.learning_rate, hp.weight_decay) == (5, 32, "sgd", 0.1, 0.0)
    assert job.sites == SITES and job.min_sites == 3 and job.quorum == 0.75  # 3 of 4 clients per round
    # model_args, data_args, tracking_args, common_args
    assert job.model.name == "logreg" and job.model.hidden == []
    assert job.dataset.name == "heart-disease"
    assert job.tags["experiment"] == "fed-heart-disease" and job.tags["imported_from"] == "fedml"
    assert job.seed == 0
    assert job.trainer is None
    # From the template: what FedML's config cannot say.
    template = JobSpec.from_yaml((ROOT / "examples" / "heart-disease.yaml").read_text())
    assert (job.features, job.privacy, job.purpose) == (template.features, template.privacy, template.purpose)

    s = statuses(result)
    for src in ("train_args.federated_optimizer", "train_args.comm_round", "train_args.epochs",
                "train_args.batch_size", "train_args.client_optimizer", "train_args.learning_rate",
                "train_args.weight_decay", "train_args.client_num_in_total", "train_args.client_num_per_round",
                "validation_args.frequency_of_the_test", "model_args.model", "data_args.dataset",
                "tracking_args.sm_experiment_name"):
        assert s.pop(src) == "mapped", src
    assert s.pop("tracking_args.wandb_key") == "secret"
    assert s.pop("comm_args") == "ignored"
    assert "backend MQTT_S3: replaced by fedsilo's transport" in detail(result, "comm_args")
    assert "each site's policy decides which file" in detail(result, "data_args.partition_method")
    # Every other field of the file is accounted for as ignored, with a reason.
    for src in ("data_args.partition_method", "data_args.data_cache_dir", "device_args.using_gpu",
                "environment_args.bootstrap", "tracking_args.wandb_project", "common_args.using_mlops",
                "train_args.client_id_list", "model_args.global_model_file_path"):
        assert s.pop(src) == "ignored", src
        assert detail(result, src).split(": ", 1)[1]
    assert s.pop("common_args.random_seed") == "mapped"
    assert set(s.values()) == {"ignored", "template"}


def test_the_written_job_validates_and_carries_no_secret() -> None:
    result = import_fedml(EXAMPLE, SITES)
    text = result.job_yaml("examples/fedml_config.yaml")
    assert JobSpec.from_yaml(text) == result.job
    printed = "\n".join(line.render() for line in result.lines) + "\n".join(result.warnings)
    for where in (text, printed):
        assert WANDB_KEY not in where
    assert "wandb" not in text
    assert any("tracking_args.wandb_key" in w and "not copied" in w for w in result.warnings)


def test_cli_writes_the_job_and_prints_the_mapping(tmp_path: Path) -> None:
    out = tmp_path / "job.yaml"
    result = CliRunner().invoke(main, ["job", "import-fedml", str(EXAMPLE), "--sites", "cleveland,hungary",
                                       "--sites", "switzerland", "--sites", "va-long-beach", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert JobSpec.from_yaml(out.read_text()).sites == SITES
    assert "mapped   train_args.comm_round" in result.stdout and f"wrote {out}" in result.stdout
    assert "warning:" in result.stderr and "tracking_args.wandb_key" in result.stderr
    assert WANDB_KEY not in result.output


def test_cli_without_output_file_keeps_stdout_a_pure_job() -> None:
    result = CliRunner().invoke(main, ["job", "import-fedml", str(EXAMPLE), "--trainer", "fedml-sgd"])
    assert result.exit_code == 0, result.output
    job = JobSpec.from_yaml(result.stdout)
    assert job.trainer == "fedml-sgd"
    assert job.sites == ["site-1", "site-2", "site-3", "site-4"]  # placeholders, and a warning saying so
    assert "no --sites given" in result.stderr and "mapped" in result.stderr


def test_unknown_model_names_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(FedMLImportError) as exc:
        import_fedml(variant(tmp_path, model_args={"model": "resnet56"}), SITES)
    assert "model_args.model 'resnet56' has no registered fedsilo model; registered models: logreg, mlp" in str(
        exc.value)
    result = CliRunner().invoke(main, ["job", "import-fedml", str(tmp_path / "fedml_config.yaml")])
    assert result.exit_code == 1 and "registered models: logreg, mlp" in result.stderr


def test_mlp_and_fedprox_map(tmp_path: Path) -> None:
    config = variant(tmp_path, model_args={"model": "mlp"},
                     train_args={"federated_optimizer": "FedProx", "fedprox_mu": 0.1, "client_optimizer": "Adam"})
    # FedProx's proximal term is not per-example, so it cannot run under the example job's per-patient DP-SGD:
    # the default template refuses it with that reason, and a per-site template takes it.
    with pytest.raises(FedMLImportError, match="fedprox is not available with record-level DP"):
        import_fedml(config, SITES)
    site_level = tmp_path / "site-level.yaml"
    site_level.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text()),
                                          "privacy": {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.4}}))
    result = import_fedml(config, SITES, template=site_level)
    assert result.job.model.name == "mlp" and result.job.aggregation == "fedprox"
    assert result.job.aggregation_params.proximal_mu == 0.1 and result.job.hyperparameters.optimizer == "adam"
    assert statuses(result)["train_args.fedprox_mu"] == "mapped"


@pytest.mark.parametrize(("sections", "message"), [
    ({"train_args": {"federated_optimizer": "FedNova"}}, "federated_optimizer 'FedNova' has no fedsilo counterpart"),
    ({"train_args": {"client_optimizer": "rmsprop"}}, "fedsilo's local optimizers: sgd, adam"),
    ({"train_args": {"client_num_per_round": 5}}, "client_num_per_round 5 exceeds client_num_in_total 4"),
    ({"train_args": {"comm_round": None}}, "train_args.comm_round: Field required"),
    ({"train_args": {"learning_rate": -1}}, "train_args.learning_rate: Input should be greater than 0"),
    ({"data_args": {"dataset": "MNIST"}}, "data_args.dataset 'MNIST' is not a fedsilo dataset name"),
    ({"data_args": {"dataset": "mnist"}}, "give --template a fedsilo job whose features describe 'mnist'"),
])
def test_configs_that_cannot_become_a_job_are_refused(tmp_path: Path, sections: dict[str, dict[str, Any]],
                                                       message: str) -> None:
    with pytest.raises(FedMLImportError) as exc:
        import_fedml(variant(tmp_path, **sections), SITES)
    assert message in str(exc.value)


def test_every_secret_anywhere_is_dropped_and_warned(tmp_path: Path) -> None:
    path = variant(tmp_path, comm_args={"s3_secret_access_key": "AKIA-SECRET-1"},
                   custom_args={"mlops": {"api_token": "tok-2"}, "db_password": "pw-3", "note": "kept out"})
    result = import_fedml(path, SITES)
    s = statuses(result)
    for src in ("tracking_args.wandb_key", "comm_args.s3_secret_access_key", "custom_args.mlops.api_token",
                "custom_args.db_password"):
        assert s[src] == "secret", src
        assert any(src in w for w in result.warnings)
    assert s["custom_args.note"] == "ignored"
    everything = result.job_yaml(str(path)) + "\n".join(line.render() for line in result.lines)
    for value in ("AKIA-SECRET-1", "tok-2", "pw-3", WANDB_KEY):
        assert value not in everything


def test_test_frequency_and_site_count_differences_are_reported(tmp_path: Path) -> None:
    result = import_fedml(variant(tmp_path, validation_args={"frequency_of_the_test": 5}), ["cleveland", "hungary"])
    assert statuses(result)["validation_args.frequency_of_the_test"] == "ignored"
    assert "every round" in detail(result, "validation_args.frequency_of_the_test")
    assert result.job.min_sites == 2 and result.job.quorum == 1.0
    assert any("client_num_in_total is 4 but 2 site(s) were given" in w for w in result.warnings)
