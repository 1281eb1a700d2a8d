"""Site data access: only declared columns are read, splits are deterministic and stratified, every statistic
used for encoding comes from the site's own training rows, and every way data can be unusable says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from agent.data import DataError, TabularEncoder, load_site_data, read_columns
from federation.jobs import DataRef, JobSpec
from federation.schema import CategoricalFeature, FeatureSchema, TargetSpec
from fedsilo.datasets import (
    HEART_DISEASE_SCHEMA,
    SITE_CENTERS,
    SYNTHETIC_SCHEMA,
    heart_disease_frame,
    split_by_center,
    synthetic_tabular,
)

REF = DataRef(name="heart-disease")
EXAMPLE_JOB = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_by_center(tmp_path_factory.mktemp("data"))


def local_split(path: Path, ref: DataRef = REF) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train/validation rows of a heart-disease file, split independently of `agent.data`."""
    frame = pd.read_csv(path, dtype={c.name: "string" for c in HEART_DISEASE_SCHEMA.categorical})
    y = (frame["num"] > 0).astype(int).to_numpy()
    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=ref.validation_fraction, random_state=ref.split_seed, stratify=y
    )
    return frame.iloc[train_idx], frame.iloc[val_idx]


# --- the data set -------------------------------------------------------------------------------------------


def test_split_by_center_writes_one_file_per_hospital(files: dict[str, Path]) -> None:
    sizes = {site: len(pd.read_csv(p)) for site, p in files.items()}
    assert sizes == {"cleveland": 304, "hungary": 293, "switzerland": 123, "va-long-beach": 200}
    assert set(files) == set(SITE_CENTERS)
    assert all(p == p.parent / f"{site}.csv" for site, p in files.items())
    hungary = pd.read_csv(files["hungary"])
    assert "dataset" not in hungary.columns
    assert list(hungary.columns) == [c for c in heart_disease_frame().columns if c != "dataset"]
    # Written via temp file + rename: nothing but the four files is left behind.
    assert sorted(p.name for p in next(iter(files.values())).parent.iterdir()) == sorted(f"{s}.csv" for s in files)


def test_heart_disease_schema_matches_the_example_job_and_the_csv() -> None:
    assert HEART_DISEASE_SCHEMA.input_dim() == 25
    assert JobSpec.from_yaml(EXAMPLE_JOB.read_text()).features == HEART_DISEASE_SCHEMA
    frame = heart_disease_frame()
    assert len(frame) == 920
    assert set(frame["dataset"]) == set(SITE_CENTERS.values())
    for cat in HEART_DISEASE_SCHEMA.categorical:  # spelled exactly as in the file, nothing left out
        assert set(frame[cat.name].dropna().astype(str)) == set(cat.vocabulary), cat.name


# --- split ---------------------------------------------------------------------------------------------------


def test_encoding_has_the_schema_width_and_the_split_is_stratified(files: dict[str, Path]) -> None:
    for site, path in files.items():
        d = load_site_data(path, HEART_DISEASE_SCHEMA, REF)
        assert d.x_train.shape == (d.n_train, 25) and d.x_val.shape == (d.n_val, 25)
        assert d.x_train.dtype == d.y_train.dtype == d.x_val.dtype == d.y_val.dtype == np.float32
        assert set(np.unique(d.y_train)) == set(np.unique(d.y_val)) == {0.0, 1.0}
        assert np.isfinite(d.x_train).all() and np.isfinite(d.x_val).all()
        _, val = local_split(path)
        assert d.n_val == len(val)
        # Stratified: the validation split has the site's positive rate, to within one row.
        y = np.concatenate([d.y_train, d.y_val])
        assert abs(d.y_val.sum() - d.n_val * y.mean()) <= 1, site
    assert sum(load_site_data(p, HEART_DISEASE_SCHEMA, REF).n_val for p in files.values()) == 308


def test_split_is_deterministic_and_seeded(files: dict[str, Path]) -> None:
    a = load_site_data(files["hungary"], HEART_DISEASE_SCHEMA, REF)
    b = load_site_data(files["hungary"], HEART_DISEASE_SCHEMA, REF)
    c = load_site_data(files["hungary"], HEART_DISEASE_SCHEMA, DataRef(name="heart-disease", split_seed=7))
    for field in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.x_val, c.x_val)
    half = load_site_data(files["hungary"], HEART_DISEASE_SCHEMA, REF.model_copy(update={"validation_fraction": 0.5}))
    assert half.n_val == 147 and half.n_train == 146


def test_rows_without_a_target_are_dropped(files: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_csv(files["cleveland"])
    frame.loc[:3, "num"] = np.nan
    path = tmp_path / "cleveland.csv"
    frame.to_csv(path, index=False)
    d = load_site_data(path, HEART_DISEASE_SCHEMA, REF)
    assert d.n_train + d.n_val == 300


def test_a_class_with_a_single_row_falls_back_to_an_unstratified_split(tmp_path: Path) -> None:
    frame = synthetic_tabular(60, seed=3)
    frame["label"] = "no"
    frame.loc[7, "label"] = "yes"
    path = tmp_path / "s.csv"
    frame.to_csv(path, index=False)
    d = load_site_data(path, SYNTHETIC_SCHEMA, DataRef(name="synthetic"))
    assert d.n_train + d.n_val == 60 and d.y_train.sum() + d.y_val.sum() == 1


# --- encoding: local statistics only -------------------------------------------------------------------------


def test_statistics_come_from_the_local_training_split_only(files: dict[str, Path], tmp_path: Path) -> None:
    d = load_site_data(files["cleveland"], HEART_DISEASE_SCHEMA, REF)
    train, val = local_split(files["cleveland"])
    enc = TabularEncoder(HEART_DISEASE_SCHEMA).fit(train)
    for col in HEART_DISEASE_SCHEMA.numeric:
        filled = train[col].fillna(train[col].median())
        assert enc.medians[col] == pytest.approx(train[col].median())
        assert enc.means[col] == pytest.approx(filled.mean())
        assert enc.stds[col] == pytest.approx(filled.std(ddof=0))
    # The site's encoding is exactly an encoder fitted on its own training rows ...
    np.testing.assert_allclose(d.x_train, enc.transform(train), atol=1e-6)
    np.testing.assert_allclose(d.x_val, enc.transform(val), atol=1e-6)
    # ... and not one fitted on all its rows or on the pooled data of all sites.
    everything = pd.concat([pd.read_csv(p, dtype={c.name: "string" for c in HEART_DISEASE_SCHEMA.categorical})
                            for p in files.values()])
    for other in (pd.concat([train, val]), everything):
        assert not np.allclose(d.x_train, TabularEncoder(HEART_DISEASE_SCHEMA).fit(other).transform(train))
    # Standardized numeric training columns have mean 0 and std 1 on the training rows themselves.
    np.testing.assert_allclose(d.x_train[:, 0].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.x_train[:, 0].std(), 1.0, atol=1e-4)


def test_validation_rows_and_other_sites_do_not_change_the_training_encoding(
    files: dict[str, Path], tmp_path: Path
) -> None:
    d = load_site_data(files["cleveland"], HEART_DISEASE_SCHEMA, REF)
    frame = pd.read_csv(files["cleveland"])
    _, val = local_split(files["cleveland"])
    frame.loc[val.index, "age"] = 1000
    frame.loc[val.index, "cp"] = "typical angina"
    frame.loc[val.index, "chol"] = np.nan
    changed = tmp_path / "cleveland.csv"
    frame.to_csv(changed, index=False)
    # Another site's file changes too: it must not matter.
    other = pd.read_csv(files["hungary"])
    other["age"] = 5
    other.to_csv(tmp_path / "hungary.csv", index=False)
    e = load_site_data(changed, HEART_DISEASE_SCHEMA, REF)
    np.testing.assert_array_equal(d.x_train, e.x_train)
    np.testing.assert_array_equal(d.y_train, e.y_train)
    assert not np.array_equal(d.x_val, e.x_val)


def test_encoder_imputes_numeric_with_the_local_median() -> None:
    frame = pd.DataFrame({"x1": [1.0, 3.0, None, 5.0], "x2": [0.0] * 4, "x3": [None] * 4, "x4": [1.0, 2, 3, 4],
                          "color": ["red", "red", None, "purple"], "size": ["S", "M", "L", "S"], "label": ["yes"] * 4})
    enc = TabularEncoder(SYNTHETIC_SCHEMA).fit(frame)
    assert enc.medians["x1"] == 3.0
    x = enc.transform(frame)
    assert x.shape == (4, SYNTHETIC_SCHEMA.input_dim())
    assert x[2, 0] == pytest.approx(0.0)  # imputed with the median, which is also the mean here
    assert (x[:, 1] == 0).all() and (x[:, 2] == 0).all()  # a constant or all-missing column carries nothing
    red = 4  # first one-hot column of `color`
    assert SYNTHETIC_SCHEMA.encoded_names()[red] == "color=red"
    assert x[0, red] == 1.0 and x[0, red : red + 3].sum() == 1.0
    assert x[2, red : red + 3].sum() == 0.0  # missing: all zeros, its own implicit level
    assert x[3, red : red + 3].sum() == 0.0 and enc.unknown_values == 1  # unknown value: all zeros, counted
    assert (x[:, 7:10].sum(axis=1) == 1).all()  # `size`: one-hot in vocabulary order S, M, L
    np.testing.assert_array_equal(x[:, 7:10].argmax(axis=1), [0, 1, 2, 0])


def test_encoder_edge_cases() -> None:
    flag = CategoricalFeature(name="flag", vocabulary=["False", "True"])
    schema = FeatureSchema(numeric=["a", "b"], categorical=[flag], target=TargetSpec(column="y", positive_above=0))
    # A constant non-integer column has a floating-point std of ~1e-17: it must still encode as 0, not as noise.
    frame = pd.DataFrame({"a": [0.1] * 7, "b": ["1", "?", "inf", "4", "5", "6", "7"],
                          "flag": pd.Series(["True", "False", None, "True", "False", "True", "yes"], dtype="string")})
    enc = TabularEncoder(schema)
    with pytest.raises(RuntimeError, match="before fit"):
        enc.transform(frame)
    x = enc.fit(frame).transform(frame)
    assert (x[:, 0] == 0).all()
    assert enc.medians["b"] == 5.0  # "?" and "inf" count as missing
    assert np.isfinite(x).all() and x[1, 1] == x[2, 1] == pytest.approx(x[4, 1])
    np.testing.assert_array_equal(x[:, 2:], [[0, 1], [1, 0], [0, 0], [0, 1], [1, 0], [0, 1], [0, 0]])
    assert enc.unknown_values == 1


# --- what is read ----------------------------------------------------------------------------------------------


def test_only_declared_columns_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    synthetic_tabular(100, seed=0).to_csv(path, index=False)  # carries a `patient_name` column
    assert list(read_columns(path, SYNTHETIC_SCHEMA).columns) == [*SYNTHETIC_SCHEMA.columns(), "label"]
    seen: list[dict[str, Any]] = []
    real = pd.read_csv

    def spy(*args: Any, **kwargs: Any) -> pd.DataFrame:
        seen.append(kwargs)
        frame: pd.DataFrame = real(*args, **kwargs)
        return frame

    monkeypatch.setattr(pd, "read_csv", spy)
    d = load_site_data(path, SYNTHETIC_SCHEMA, DataRef(name="synthetic"))
    assert d.x_train.shape[1] == SYNTHETIC_SCHEMA.input_dim()
    # Every read either loads no rows (the header, to name missing columns) or only the declared columns.
    assert seen and all(kw.get("nrows") == 0 or "usecols" in kw for kw in seen)
    full_reads = [kw["usecols"] for kw in seen if kw.get("nrows") != 0]
    assert full_reads and all(set(u) == {*SYNTHETIC_SCHEMA.columns(), "label"} for u in full_reads)


def test_categorical_and_target_values_are_compared_as_text(tmp_path: Path) -> None:
    schema = FeatureSchema(numeric=["age"], categorical=[CategoricalFeature(name="fbs", vocabulary=["False", "True"])],
                           target=TargetSpec(column="exang", positive_values=["True"]))
    path = tmp_path / "s.csv"
    frame = pd.DataFrame({"age": range(30), "fbs": [True, False, None] * 10, "exang": [True, False] * 15})
    frame.to_csv(path, index=False)
    d = load_site_data(path, schema, DataRef(name="s"))
    assert d.y_train.sum() + d.y_val.sum() == 15
    x = np.concatenate([d.x_train, d.x_val])
    assert x[:, 1:].sum() == 20  # True and False match the vocabulary; missing stays all-zero


def test_the_synthetic_dataset_loads_with_its_schema_and_is_learnable(tmp_path: Path) -> None:
    frame = synthetic_tabular(400, seed=1)
    assert set(frame["label"]) == {"yes", "no"} and frame.isna().any().any()
    path = tmp_path / "synthetic.csv"
    frame.to_csv(path, index=False)
    d = load_site_data(path, SYNTHETIC_SCHEMA, DataRef(name="synthetic"))
    assert d.x_train.shape == (d.n_train, SYNTHETIC_SCHEMA.input_dim()) and d.n_train + d.n_val == 400
    model = LogisticRegression(max_iter=1000).fit(d.x_train, d.y_train)
    assert roc_auc_score(d.y_val, model.decision_function(d.x_val)) > 0.75


# --- data errors ---------------------------------------------------------------------------------------------

HEADER = ",".join([*HEART_DISEASE_SCHEMA.columns(), "num"]) + "\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^data file .*site\.csv does not exist$"),
        ("age,num\n1,0\n", r"^column\(s\) missing from data file .*: \['trestbps', 'chol', "),
        ("", r"^cannot read data file .*: the file is empty"),
        (HEADER, r"^data file .* has no rows$"),
        (HEADER + ",,,,,,,,,,,,,\n" * 3, r"has no rows with a value in target column 'num'$"),
        (HEADER + '61,"unterminated,,,,,,,,,,,,1\n', r"^cannot read data file .*: Error tokenizing data"),
        (HEADER + "61,,,,,,,,,,,,,unknown\n61,,,,,,,,,,,,,1\n", r"'num' has 1 non-numeric value"),
        (HEADER + "61,,,,,,,,,,,,,0\n" * 5, r"^target column 'num' has only one class at this site"),
    ],
)
def test_data_errors_say_why(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "site.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_site_data(path, HEART_DISEASE_SCHEMA, REF)


def test_a_directory_is_not_a_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read data file"):
        load_site_data(tmp_path, HEART_DISEASE_SCHEMA, REF)


def test_single_class_data_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_csv(files["switzerland"])
    frame["num"] = 1
    one_class = tmp_path / "one.csv"
    frame.to_csv(one_class, index=False)
    with pytest.raises(DataError, match="target column 'num' has only one class at this site"):
        load_site_data(one_class, HEART_DISEASE_SCHEMA, REF)


def test_unreadable_file_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    # Tests may run as root, who reads anything: simulate the OS refusing the read.
    def denied(*args: Any, **kwargs: Any) -> pd.DataFrame:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pd, "read_csv", denied)
    with pytest.raises(DataError, match=r"cannot read data file .*: permission denied"):
        load_site_data(files["hungary"], HEART_DISEASE_SCHEMA, REF)
