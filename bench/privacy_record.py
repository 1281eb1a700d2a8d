"""The per-patient unit of the privacy–utility benchmark: record-level DP-SGD at a target ε per patient.

Each site calibrates its own DP-SGD σ for its own record count (`agent.dpsgd.record_plan`), clips its update to the
job's `clip_norm` and adds no update-level noise. The configuration per target comes from an in-process grid search
(`python -m bench privacy-utility --unit record --search`) run with the agents' own functions (`record_plan`,
`train_dpsgd`, `clip`) and the aggregator's FedAvg; the table comes from the real deployment.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.data import SiteData
from agent.dpsgd import record_plan, train_dpsgd
from aggregator.engine import initial_weights
from aggregator.strategies import FedAvg
from bench.federated import example_job, score
from bench.privacy_utility import LEAN_PRIOR
from federation.jobs import JobSpec
from federation.models import build_model, get_weights, set_weights
from federation.privacy import clip

TARGETS = [0.5, 1.0, 2.0, 4.0, 8.0]
DELTA = 1e-5


@dataclass(frozen=True)
class RecordConfig:
    rounds: int
    epochs: int
    batch_size: int
    learning_rate: float
    record_clip_norm: float
    clip_norm: float = 1.0
    init: str = "zeros"  # or "prior": the published clinical prior (`bench.privacy_utility.LEAN_PRIOR`), no ε

    def text(self) -> str:
        return (f"{self.rounds} rounds × {self.epochs} epochs, batch {self.batch_size}, lr {self.learning_rate:g}, "
                f"record clip {self.record_clip_norm:g}, update clip {self.clip_norm:g}, {self.init} start")


def record_job(eps: float, cfg: RecordConfig, seed: int) -> dict[str, Any]:
    return example_job(
        name=f"privacy-utility-record-eps{eps:g}", seed=seed, rounds=cfg.rounds, min_sites=4,
        model={"name": "logreg", "init": cfg.init, **({"prior": LEAN_PRIOR} if cfg.init == "prior" else {})},
        hyperparameters={"epochs": cfg.epochs, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size},
        privacy={"unit": "record", "target_epsilon": eps, "record_clip_norm": cfg.record_clip_norm,
                 "clip_norm": cfg.clip_norm, "delta": DELTA},
    )


def simulate_record(spec: JobSpec, data: dict[str, SiteData]) -> float:
    """One record-level job in-process, as the agents and the aggregator run it; returns the pooled AUC."""
    weights = initial_weights(spec)
    plans = {site: record_plan(spec, d.n_train) for site, d in data.items()}
    strategy = FedAvg(spec.server_learning_rate)
    for _ in range(spec.rounds):
        strategy.reset(weights)
        for site, d in data.items():
            local = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
            set_weights(local, weights)
            train_dpsgd(local, d.x_train, d.y_train, spec, plans[site])
            after = get_weights(local)
            clipped, _ = clip({k: after[k] - weights[k] for k in weights}, spec.privacy.clip_norm)
            strategy.add(clipped, d.n_train)
        weights = strategy.apply(weights)
    return score(weights, spec, data)[1]


GRID = [RecordConfig(r, e, b, lr, c) for r, e, b, lr, c in
        itertools.product([5, 10], [1, 2], [64, 128], [0.3, 1.0], [1.0])]


def search_record(console: Console, data: dict[str, SiteData], targets: list[float], repeats: int,
                  grid: list[RecordConfig] = GRID) -> None:
    for eps in targets:
        table = Table(title=f"in-process search, per-patient target ε {eps:g} (δ {DELTA:g}), {repeats} runs each")
        for col in ("config", "σ per site", "pooled AUC mean", "sd"):
            table.add_column(col, justify="left" if col == "config" else "right")
        rows = []
        for cfg in grid:
            spec = JobSpec.model_validate(record_job(eps, cfg, 0))
            sigmas = " ".join(f"{record_plan(spec, d.n_train).noise_multiplier:.2f}" for d in data.values())
            aucs = [simulate_record(spec.model_copy(update={"seed": k}), data) for k in range(repeats)]
            rows.append((statistics.mean(aucs), statistics.pstdev(aucs), cfg, sigmas))
            console.print(f"{cfg.text()}: {rows[-1][0]:.3f} ± {rows[-1][1]:.3f}  σ {sigmas}")
        for mean, sd, cfg, sigmas in sorted(rows, key=lambda r: -r[0])[:10]:
            table.add_row(cfg.text(), sigmas, f"{mean:.3f}", f"{sd:.3f}")
        console.print(table)
