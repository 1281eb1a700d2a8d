"""Non-federated reference points on the same per-site split and per-site encoding as the federation:
centralized logistic regression on the pooled training sets (the upper bound) and one model per site.

Every site is encoded by `agent.data.load_site_data` on its own file, exactly as its agent would, so the
baselines differ from the federated runs only in how the model is trained. Pooling happens after encoding:
no statistic is ever computed on several sites' data.

Run: `.venv/bin/python -m bench.baselines` (the split and schema of `examples/heart-disease.yaml`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from agent.data import SiteData, load_site_data
from federation.jobs import DataRef, JobSpec
from federation.schema import FeatureSchema
from fedsilo.datasets import split_by_center

EXAMPLE_JOB = Path(__file__).resolve().parents[1] / "examples" / "heart-disease.yaml"


@dataclass
class Baseline:
    label: str
    site_auc: dict[str, float]
    pooled_auc: float


def load_sites(files: dict[str, Path], schema: FeatureSchema, ref: DataRef) -> dict[str, SiteData]:
    """Each site's split and encoding, from its own file only (what its agent would train and validate on)."""
    return {site: load_site_data(path, schema, ref) for site, path in files.items()}


def _score(model: LogisticRegression, data: dict[str, SiteData]) -> tuple[dict[str, float], float]:
    per_site = {s: float(roc_auc_score(d.y_val, model.decision_function(d.x_val))) for s, d in data.items()}
    x = np.concatenate([d.x_val for d in data.values()])
    y = np.concatenate([d.y_val for d in data.values()])
    return per_site, float(roc_auc_score(y, model.decision_function(x)))


def centralized_and_local(data: dict[str, SiteData]) -> list[Baseline]:
    """Pooled-train logistic regression, then each site's model trained alone, all scored as ROC AUC on every
    site's validation split and on the pooled validation set (the per-site encoded splits concatenated)."""
    x = np.concatenate([d.x_train for d in data.values()])
    y = np.concatenate([d.y_train for d in data.values()])
    pooled = LogisticRegression(max_iter=1000).fit(x, y)
    out = [Baseline("centralized (pooled train)", *_score(pooled, data))]
    for site, d in data.items():
        model = LogisticRegression(max_iter=1000).fit(d.x_train, d.y_train)
        out.append(Baseline(f"{site} alone", *_score(model, data)))
    return out


def table(baselines: list[Baseline], data: dict[str, SiteData]) -> Table:
    sites = list(data)
    t = Table(title="Baselines: validation ROC AUC (per-site encoding and stratified split, no federation)")
    t.add_column("method")
    for site in sites:
        t.add_column(f"{site}\n(n={data[site].n_val})", justify="right")
    t.add_column(f"pooled\n(n={sum(d.n_val for d in data.values())})", justify="right")
    for b in baselines:
        t.add_row(b.label, *(f"{b.site_auc[s]:.3f}" for s in sites), f"{b.pooled_auc:.3f}")
    return t


def main() -> None:
    spec = JobSpec.from_yaml(EXAMPLE_JOB.read_text())
    with tempfile.TemporaryDirectory(prefix="fedsilo-baselines-") as tmp:
        data = load_sites(split_by_center(Path(tmp)), spec.features, spec.dataset)
    Console(width=160).print(table(centralized_and_local(data), data))


if __name__ == "__main__":
    main()
