"""`fedsilo job init`: a job proposed from one CSV's header and column types, reading no more than it needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.jobs import JobSpec
from fedsilo.cli import main
from fedsilo.datasets import clinic_frame
from fedsilo.jobinit import JobInitError, propose_job


@pytest.fixture
def csv(tmp_path: Path) -> Path:
    path = tmp_path / "north.csv"
    clinic_frame("north", 200).to_csv(path, index=False)
    return path


def test_numeric_and_categorical_columns_with_vocabularies_and_an_identifier_left_out(csv: Path) -> None:
    text, notes = propose_job(csv, "outcome", ["north", "south"], positive=["relapse"])
    spec = JobSpec.from_yaml(text)
    assert spec.features.numeric == ["age", "bmi", "length_of_stay", "prior_admissions"]
    assert [c.name for c in spec.features.categorical] == ["ward", "smoker", "admission"]
    assert spec.features.target.positive_values == ["relapse"]
    assert (spec.sites, spec.min_sites, spec.dataset.name, spec.name) == (["north", "south"], 2, "outcome",
                                                                        "outcome-logreg")
    assert "left out patient_id: its name says it identifies a person or record" in notes
    assert "A categorical vocabulary is data" in text and "#   patient_id:" in text


def test_reads_only_the_rows_it_is_allowed(tmp_path: Path) -> None:
    frame = clinic_frame("south", 60)
    path = tmp_path / "south.csv"
    text = frame.to_csv(index=False) + "this line, is not, a, valid, row, of, this, file, at, all\n" * 3
    path.write_text(text + frame.assign(ward="burns").to_csv(index=False, header=False))
    proposed, notes = propose_job(path, "outcome", ["south"], positive=["relapse"], max_rows=60)
    spec = JobSpec.from_yaml(proposed)
    ward = next(c for c in spec.features.categorical if c.name == "ward")
    assert "burns" not in ward.vocabulary  # rows past --rows were never read (nor the broken lines)
    assert notes[0].startswith(f"read the header and 60 row(s) of {path}")


def test_rare_values_are_left_out_of_a_vocabulary(tmp_path: Path) -> None:
    frame = clinic_frame("east", 200)
    frame.loc[:2, "ward"] = "transplant"  # three patients only: could identify them
    path = tmp_path / "east.csv"
    frame.to_csv(path, index=False)
    text, _ = propose_job(path, "outcome", ["east"], positive=["relapse"], min_count=5)
    ward = next(c for c in JobSpec.from_yaml(text).features.categorical if c.name == "ward")
    assert "transplant" not in ward.vocabulary
    assert "- {name: ward, vocabulary: [cardio, general, onco, ortho]}   # 1 rare value(s) left out" in text


def test_target_rules(tmp_path: Path, csv: Path) -> None:
    with pytest.raises(JobInitError, match=r"say which values of target column 'outcome' are positive.*relapse"):
        propose_job(csv, "outcome", ["north"])
    with pytest.raises(JobInitError, match="none of cured appears in target column 'outcome'"):
        propose_job(csv, "outcome", ["north"], positive=["cured"])
    with pytest.raises(JobInitError, match="is not numeric"):
        propose_job(csv, "outcome", ["north"], positive_above=1.0)
    text, _ = propose_job(csv, "prior_admissions", ["north"], positive_above=2)
    assert JobSpec.from_yaml(text).features.target.positive_above == 2
    frame = clinic_frame("north", 100).assign(readmitted=lambda f: (f["outcome"] == "relapse").astype(int))
    frame.drop(columns=["outcome"]).to_csv(tmp_path / "binary.csv", index=False)
    text, _ = propose_job(tmp_path / "binary.csv", "readmitted", ["north"])
    assert JobSpec.from_yaml(text).features.target.positive_above == 0


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path: Path, csv: Path) -> None:
    out = tmp_path / "job.yaml"
    runner = CliRunner()
    missing = runner.invoke(main, ["job", "init", "--csv", str(csv), "--target", "relapsed", "--sites", "north",
                                   "-o", str(out)])
    assert missing.exit_code == 1 and not out.exists()
    assert missing.output.strip() == (f"Error: {csv} has no column 'relapsed' to predict; its columns are: "
                                      "patient_id, age, bmi, length_of_stay, prior_admissions, ward, smoker, "
                                      "admission, outcome")
    bad_site = runner.invoke(main, ["job", "init", "--csv", str(csv), "--target", "outcome", "--positive", "relapse",
                                    "--sites", "north,South", "-o", str(out)])
    assert bad_site.exit_code == 1 and "'South' is not a valid site name" in bad_site.output and not out.exists()
    good = runner.invoke(main, ["job", "init", "--csv", str(csv), "--target", "outcome", "--positive", "relapse",
                                "--sites", "north", "-o", str(out)])
    assert good.exit_code == 0 and out.exists()
    again = runner.invoke(main, ["job", "init", "--csv", str(csv), "--target", "outcome", "--positive", "relapse",
                                 "--sites", "north", "-o", str(out)])
    assert again.exit_code == 1 and "exists; pass --force" in again.output
