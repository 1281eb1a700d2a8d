"""`fedsilo model evaluate`: score a model file on a CSV a site holds, prepared exactly as its agent prepares data.

`rows="validation"` (default) reproduces what the site's agent reports for this file: the job's deterministic,
stratified split (`dataset.validation_fraction`, `dataset.split_seed`), the encoder fitted on the training rows,
the model scored on the validation rows. `rows="all"` is for a file held out of the federation altogether: the
encoder is fitted on that file (its own medians, means and deviations, as a site would for new data) and every row
with a target is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from agent.data import DataError, TabularEncoder, binarize, load_site_data, read_columns
from federation.jobs import JobSpec
from federation.models import build_model, check_layout, get_weights, set_weights
from federation.tensors import PayloadError, decode
from fedsilo.workspace import LocalError

Rows = Literal["validation", "all"]


class ScoringError(LocalError):
    pass


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    n: int
    mean_predicted: float | None
    observed_rate: float | None


@dataclass(frozen=True)
class Score:
    n: int
    positives: int
    auc: float | None
    loss: float
    brier: float
    calibration: list[CalibrationBin]


def _data(spec: JobSpec, data_file: Path, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    if rows == "validation":
        site = load_site_data(data_file, spec.features, spec.dataset)
        return site.x_val, site.y_val
    target = spec.features.target.column
    frame = read_columns(data_file, spec.features)
    frame = frame[frame[target].notna()].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"data file {data_file} has no rows with a value in target column {target!r}")
    return TabularEncoder(spec.features).fit(frame).transform(frame), binarize(frame[target], spec.features)


def calibration(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[CalibrationBin]:
    """Equal-width bins of predicted probability: how many rows, the mean prediction and the observed rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), n,
                                  float(p[mask].mean()) if n else None, float(y[mask].mean()) if n else None))
    return out


def score_file(model_file: Path, spec: JobSpec, data_file: Path, rows: Rows = "validation") -> Score:
    try:
        weights = decode(model_file.read_bytes())
    except OSError as exc:
        raise ScoringError(f"cannot read model file {model_file}: {exc.strerror or exc}") from None
    except PayloadError as exc:
        raise ScoringError(f"{model_file} is not a safetensors model: {exc}") from None
    model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
    try:
        check_layout(weights, get_weights(model))
    except ValueError as exc:
        raise ScoringError(f"{model_file} does not fit job {spec.name!r} (model {spec.model.name}, "
                           f"{spec.features.input_dim()} inputs): {exc}") from None
    set_weights(model, weights)
    try:
        x, y = _data(spec, data_file, rows)
    except DataError as exc:
        raise ScoringError(str(exc)) from None
    from sklearn.metrics import roc_auc_score

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).squeeze(-1)
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).float()))
        p = torch.sigmoid(logits).numpy().astype(np.float64)
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None
    return Score(n=len(y), positives=int(y.sum()), auc=auc, loss=loss, brier=float(np.mean((p - y) ** 2)),
                 calibration=calibration(p, y))


def score_lines(score: Score, rows: Rows, spec: JobSpec) -> list[str]:
    split = (f"validation split (fraction {spec.dataset.validation_fraction:.3g}, seed {spec.dataset.split_seed}; "
             "encoder fitted on the training rows)" if rows == "validation"
             else "every row with a target (encoder fitted on this file)")
    auc = "— (one class only)" if score.auc is None else f"{score.auc:.4f}"
    lines = [f"{score.n} rows ({score.positives} positive), {split}",
             f"AUC {auc}   loss {score.loss:.4f}   Brier {score.brier:.4f}",
             "calibration (predicted probability bins):",
             "  bin          rows  mean predicted  observed rate"]
    for b in score.calibration:
        mean = "—" if b.mean_predicted is None else f"{b.mean_predicted:.3f}"
        rate = "—" if b.observed_rate is None else f"{b.observed_rate:.3f}"
        lines.append(f"  {b.low:.1f}–{b.high:.1f}  {b.n:>8}  {mean:>14}  {rate:>13}")
    return lines
