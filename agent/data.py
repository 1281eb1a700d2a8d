"""A site's data access: read only the declared columns, split, and encode with local statistics only.

Imputation and scaling statistics come from this site's own training split; nothing is computed on data of
other sites (or on this site's validation rows), so no statistic has to leave the hospital for the
federation to share one input layout, and validation scores are not inflated by leakage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from federation.jobs import DataRef
from federation.schema import FeatureSchema

# A standard deviation this small relative to the mean is floating-point noise of a constant column; dividing by
# it would turn "no information" into large, arbitrary values.
_RELATIVE_STD_FLOOR = 1e-9


class DataError(Exception):
    """The site's data cannot serve the job; the message says why, in words a data steward can act on.

    The policy engine sends it back to the operator as the refusal reason, i.e. out of the hospital: it names
    the file, columns and counts, never a record's values.
    """


@dataclass(frozen=True)
class SiteData:
    """The encoded split the trainer and the evaluator use: X is (n, schema.input_dim()), y is 0/1, float32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        return len(self.y_val)


def _numeric(column: pd.Series[Any]) -> np.ndarray:
    """Numbers as float64; anything unparseable ("?", text) or infinite counts as missing."""
    values: np.ndarray = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    values[~np.isfinite(values)] = np.nan
    return values


@dataclass
class TabularEncoder:
    """Median-impute and standardize numeric columns; one-hot categoricals over the job's fixed vocabulary.

    `fit` sees only the frame it is given (the site's training split), so every statistic is local. The
    output layout is fixed by the schema alone (`schema.encoded_names()`), never by the data, so all sites
    produce the same columns. A missing categorical value encodes as all zeros, i.e. its own implicit
    "missing" level: across these hospitals missingness differs by site and carries signal (on the UCI data it
    beats imputing the site's most frequent value: centralized AUC 0.888 against 0.876). A value outside the
    vocabulary also encodes as all zeros and is counted in `unknown_values`.
    """

    schema: FeatureSchema
    medians: dict[str, float] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    unknown_values: int = 0
    _fitted: bool = field(default=False, init=False, repr=False)

    def fit(self, frame: pd.DataFrame) -> TabularEncoder:
        for col in self.schema.numeric:
            values = _numeric(frame[col])
            present = values[~np.isnan(values)]
            median = float(np.median(present)) if present.size else 0.0  # all missing: the column becomes 0
            filled = np.where(np.isnan(values), median, values)
            mean = float(filled.mean()) if filled.size else 0.0
            std = float(filled.std()) if filled.size else 0.0
            self.medians[col], self.means[col] = median, mean
            self.stds[col] = std if std > _RELATIVE_STD_FLOOR * max(1.0, abs(mean)) else 0.0
        self._fitted = True
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        if not self._fitted:
            raise RuntimeError("TabularEncoder.transform called before fit")
        out = np.zeros((len(frame), self.schema.input_dim()), dtype=np.float32)
        j = 0
        for col in self.schema.numeric:
            values = _numeric(frame[col])
            filled = np.where(np.isnan(values), self.medians[col], values)
            std = self.stds[col]
            out[:, j] = (filled - self.means[col]) / std if std > 0 else 0.0  # a constant column carries nothing
            j += 1
        for cat in self.schema.categorical:
            column = frame[cat.name].astype("string")
            codes = np.asarray(pd.Categorical(column, categories=cat.vocabulary).codes, dtype=np.int64)
            self.unknown_values += int((column.notna().to_numpy(dtype=bool) & (codes < 0)).sum())
            rows = np.nonzero(codes >= 0)[0]
            out[rows, j + codes[rows]] = 1.0
            j += len(cat.vocabulary)
        return out


def binarize(target: pd.Series[Any], schema: FeatureSchema) -> np.ndarray:
    """The 0/1 label by the job's rule. `target` must hold no missing values (the caller drops those rows)."""
    t = schema.target
    if t.positive_above is not None:
        values = pd.to_numeric(target, errors="coerce")
        bad = target[values.isna()]
        if len(bad):
            raise DataError(f"target column {t.column!r} has {len(bad)} non-numeric value(s), "
                            "but the job's rule `positive_above` compares numbers")
        return (values > t.positive_above).to_numpy(dtype=np.float32)
    return target.astype("string").isin(set(t.positive_values or [])).to_numpy(dtype=np.float32)


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    """`pandas.read_csv`, with every way a file can fail to read turned into a DataError that says why."""
    try:
        frame: pd.DataFrame = pd.read_csv(path, **kwargs)
    except PermissionError:
        raise DataError(f"cannot read data file {path}: permission denied") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"cannot read data file {path}: the file is empty (no header line)") from None
    except (OSError, ValueError) as exc:  # ParserError and UnicodeDecodeError are ValueErrors
        raise DataError(f"cannot read data file {path}: {exc}") from None
    return frame


def read_columns(path: Path, schema: FeatureSchema) -> pd.DataFrame:
    """Read only the schema's columns and the target; any other column of the file is never loaded.

    Only the header line is read before `usecols` is applied, so a column the job did not declare (a name, an
    identifier) never enters memory. Categorical columns are read as text, so `True` in a file is "True".
    """
    wanted = [*schema.columns(), schema.target.column]
    try:
        exists = path.exists()
    except PermissionError:
        raise DataError(f"cannot read data file {path}: permission denied") from None
    if not exists:
        raise DataError(f"data file {path} does not exist")
    header = set(_read_csv(path, nrows=0).columns)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"column(s) missing from data file {path}: {missing}")
    dtypes = {c.name: "string" for c in schema.categorical}
    if schema.target.positive_values is not None:
        dtypes[schema.target.column] = "string"
    return _read_csv(path, usecols=wanted, dtype=dtypes)


def load_site_data(path: Path, schema: FeatureSchema, data: DataRef) -> SiteData:
    """Read, binarize, split (deterministic, stratified) and encode this site's data for a job.

    Rows without a target are dropped. The split depends only on the file and on the job's
    `validation_fraction` and `split_seed`, so a restarted agent gets the same split; the encoder is fitted on
    the training rows alone.
    """
    target = schema.target.column
    frame = read_columns(path, schema)
    if frame.empty:
        raise DataError(f"data file {path} has no rows")
    frame = frame[frame[target].notna()].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"data file {path} has no rows with a value in target column {target!r}")
    y = binarize(frame[target], schema)
    counts = np.bincount(y.astype(np.int64), minlength=2)
    if counts.min() == 0:
        label = "positive" if counts[1] else "negative"
        raise DataError(f"target column {target!r} has only one class at this site (all {len(y)} rows {label})")
    stratify = y if counts.min() >= 2 else None  # stratification needs two rows of each class
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(y)), test_size=data.validation_fraction, random_state=data.split_seed, stratify=stratify
        )
    except ValueError as exc:
        raise DataError(f"cannot split {len(y)} rows into train and validation: {exc}") from None
    train, val = frame.iloc[train_idx], frame.iloc[val_idx]
    encoder = TabularEncoder(schema).fit(train)
    return SiteData(encoder.transform(train), y[train_idx], encoder.transform(val), y[val_idx])
