"""`fedsilo model evaluate`: a model scored on a site's file with the agent's own preparation and split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent.data import load_site_data
from agent.trainer import evaluate, train_local
from federation.jobs import JobSpec
from federation.models import build_model, get_weights
from federation.tensors import encode
from fedsilo.cli import main
from fedsilo.datasets import clinic_frame
from fedsilo.jobinit import propose_job
from fedsilo.scoring import ScoringError, calibration, score_file


@pytest.fixture
def setup(tmp_path: Path) -> tuple[JobSpec, Path, Path, Path]:
    data = tmp_path / "north.csv"
    clinic_frame("north", 300).to_csv(data, index=False)
    text, _ = propose_job(data, "outcome", ["north"], positive=["relapse"])
    (tmp_path / "job.yaml").write_text(text)
    spec = JobSpec.from_yaml(text)
    site = load_site_data(data, spec.features, spec.dataset)
    model = build_model(spec.model.name, spec.features.input_dim())
    train_local(model, site.x_train, site.y_train, spec.hyperparameters, seed=1)
    (tmp_path / "model.safetensors").write_bytes(encode(get_weights(model)))
    return spec, data, tmp_path / "model.safetensors", tmp_path / "job.yaml"


def test_validation_rows_score_as_the_agent_scores_them(setup: tuple[JobSpec, Path, Path, Path]) -> None:
    spec, data, model_file, _ = setup
    score = score_file(model_file, spec, data, "validation")
    site = load_site_data(data, spec.features, spec.dataset)
    model = build_model(spec.model.name, spec.features.input_dim())
    from federation.models import set_weights
    from federation.tensors import decode

    set_weights(model, decode(model_file.read_bytes()))
    agent = evaluate(model, site.x_val, site.y_val)
    assert score.n == agent.n == 100
    assert score.auc == pytest.approx(agent.auc, abs=1e-9) and score.loss == pytest.approx(agent.loss, abs=1e-6)
    assert score.auc is not None and score.auc > 0.6
    assert sum(b.n for b in score.calibration) == score.n
    everything = score_file(model_file, spec, data, "all")
    assert everything.n == 300


def test_calibration_bins() -> None:
    p = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    bins = calibration(p, y)
    assert [b.n for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[1].mean_predicted == pytest.approx(0.15) and bins[1].observed_rate == pytest.approx(0.5)
    assert bins[2].mean_predicted is None


def test_a_model_of_another_job_or_no_model_is_refused(setup: tuple[JobSpec, Path, Path, Path],
                                                       tmp_path: Path) -> None:
    spec, data, _, job = setup
    other = tmp_path / "other.safetensors"
    other.write_bytes(encode(get_weights(build_model("logreg", 3))))
    with pytest.raises(ScoringError, match="does not fit job 'outcome-logreg'"):
        score_file(other, spec, data)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["model", "evaluate", str(junk), "--job", str(job), "--data", str(data)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {junk} is not a safetensors model")


def test_cli_prints_auc_loss_and_calibration(setup: tuple[JobSpec, Path, Path, Path]) -> None:
    _, data, model_file, job = setup
    result = CliRunner().invoke(main, ["model", "evaluate", str(model_file), "--job", str(job), "--data", str(data),
                                       "--rows", "all"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    positives = (clinic_frame("north", 300)["outcome"] == "relapse").sum()
    assert lines[0] == f"300 rows ({positives} positive), every row with a target (encoder fitted on this file)"
    assert lines[1].startswith("AUC 0.") and "loss" in lines[1] and "Brier" in lines[1]
    assert lines[3].split() == ["bin", "rows", "mean", "predicted", "observed", "rate"] and len(lines) == 14
