"""The per-patient unit of the privacy–utility benchmark: record-level DP-SGD at a target ε per patient.

Each site calibrates its own DP-SGD σ for its own record count (`agent.record_plan.record_plan`), clips its update
to the job's `clip_norm` and adds no update-level noise. The configuration per target comes from an in-process grid
search (`python -m bench privacy-utility --unit record --search`) run with the agents' own functions (`record_plan`,
`train_dpsgd`, `clip`) and the aggregator's FedAvg; the table comes from the real deployment.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.data import SiteData
from agent.dpsgd import train_dpsgd
from agent.record_plan import record_plan
from aggregator.runner import initial_weights
from aggregator.strategies import FedAvg
from bench.federated import example_job, run_jobs, score
from bench.privacy_utility import DELTA, LEAN_PRIOR, held_out_sites
from federation.jobs import JobSpec
from federation.models import build_model, get_weights, set_weights
from federation.privacy import clip


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


# The last of three grids (docs/benchmarks.md has all three): learning rate, per-example clip and update clip around
# the best of the first two (10 rounds × 1 epoch, batch 64).
GRID = [RecordConfig(10, 1, 64, lr, c, uc) for lr, c, uc in itertools.product([2.0, 4.0], [0.3, 0.5], [1.0, 10.0])]


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


# Chosen by `--unit record --search` (docs/benchmarks.md): one configuration for every target, as the example job.
CHOSEN = RecordConfig(rounds=10, epochs=1, batch_size=64, learning_rate=4.0, record_clip_norm=0.3, clip_norm=1.0)


def noise_free_job(cfg: RecordConfig, seed: int) -> dict[str, Any]:
    """The same job without DP (no per-example clipping, no noise; the update clip kept): the ceiling."""
    return {**record_job(0.0, cfg, seed), "name": "privacy-utility-record-noise-free",
            "privacy": {"unit": "site", "clip_norm": cfg.clip_norm, "noise_multiplier": 0.0, "allow_no_noise": True}}


def measure_record(console: Console, targets: list[float], seeds: int, cfg: RecordConfig = CHOSEN) -> None:
    jobs = {f"{eps:g}/{seed}": record_job(eps, cfg, seed) for eps in targets for seed in range(seeds)}
    jobs |= {f"free/{seed}": noise_free_job(cfg, seed) for seed in range(min(seeds, 5))}
    t0 = time.monotonic()
    results = {r.label: r for r in run_jobs(jobs)}
    wall = time.monotonic() - t0
    data = held_out_sites(JobSpec.model_validate(record_job(1.0, cfg, 0)))
    table = Table(title=f"Privacy–utility on the real deployment, ε per patient record (record-level DP-SGD, δ "
                        f"{DELTA:g}, no update-level noise): pooled-validation AUC, {seeds} seeds per target; "
                        f"{cfg.text()}")
    for col in ("unit", "target ε", "DP-SGD σ per site (" + " / ".join(data) + ")", "ε spent (max over sites)",
                "pooled AUC mean ± sd", "jobs finished"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for eps in targets:
        runs = [results[f"{eps:g}/{seed}"] for seed in range(seeds)]
        spec = JobSpec.model_validate(record_job(eps, cfg, 0))
        sigmas = " / ".join(f"{record_plan(spec, d.n_train).noise_multiplier:.2f}" for d in data.values())
        spent = [e for r in runs for e in r.epsilon.values() if e is not None]
        aucs = [r.pooled_auc for r in runs]
        table.add_row("per patient", f"{eps:g}", sigmas, f"{max(spent):.3f}" if spent else "—",
                      f"{statistics.mean(aucs):.3f} ± {statistics.pstdev(aucs):.3f}",
                      f"{sum(r.state == 'finished' for r in runs)}/{seeds}")
    free = [r for label, r in results.items() if label.startswith("free/")]
    aucs = [r.pooled_auc for r in free]
    table.add_row("none (no DP)", "∞", "—", "—", f"{statistics.mean(aucs):.3f} ± {statistics.pstdev(aucs):.3f}",
                  f"{sum(r.state == 'finished' for r in free)}/{len(free)}")
    console.print(table)
    console.print(f"{len(jobs)} jobs in {wall:.0f} s; σ per site as each agent calibrates it (`record_plan`, "
                  "deterministic), ε spent as the agents reported it.")


def demo_gap(console: Console, runs: int) -> None:
    """The example job (what `make demo` runs) against the same job without DP, `runs` times each on the real
    deployment: the demo's closing figure (the sites' sample-weighted validation AUC of the final model), the
    pooled AUC, and the ε per patient the sites reported."""
    example = example_job()
    free = {**example, "name": "heart-disease-logreg-noise-free",
            "privacy": {"unit": "site", "clip_norm": example["privacy"]["clip_norm"], "noise_multiplier": 0.0,
                        "allow_no_noise": True}}
    jobs = {f"{kind}/{i}": {**job, "seed": i} for i in range(runs) for kind, job in (("dp", example), ("free", free))}
    results = {r.label: r for r in run_jobs(jobs)}
    table = Table(title=f"make demo's job with and without per-patient DP, {runs} runs each on the real deployment")
    for col in ("job", "final validation AUC (demo's figure), median [min, max]", "pooled AUC mean ± sd",
                "max ε reported", "finished"):
        table.add_column(col, justify="left" if col == "job" else "right")
    medians = {}
    for kind, name in (("dp", "example (ε ≤ 1 per patient record)"), ("free", "same job, no DP")):
        rs = [results[f"{kind}/{i}"] for i in range(runs)]
        demo = [r.global_auc for r in rs]
        medians[kind] = statistics.median(demo)
        eps = [e for r in rs for e in r.epsilon.values() if e is not None]
        table.add_row(name, f"{medians[kind]:.4f} [{min(demo):.4f}, {max(demo):.4f}]",
                      f"{statistics.mean(r.pooled_auc for r in rs):.3f} ± "
                      f"{statistics.pstdev(r.pooled_auc for r in rs):.3f}",
                      f"{max(eps):.3f} per patient" if eps else "— (no guarantee)",
                      f"{sum(r.state == 'finished' for r in rs)}/{runs}")
    console.print(table)
    console.print(f"gap of the medians: {medians['dp'] - medians['free']:+.4f} AUC (goal: within 0.01)")
