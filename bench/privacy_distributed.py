"""Per patient with the noise in the secure sum (`privacy: {unit: record, record_noise: distributed}`).

Each round every site takes its records' clipped gradients (full batch, no noise of its own), sends −lr/b × their
sum masked with its share of discrete Gaussian noise, and the aggregator sees only the noised sum: DP gradient
descent over all four centers' records with one central mechanism's noise, instead of four DP-SGD runs each noised
for its own records. The configuration came from an in-process search with the agents' and the aggregator's own
functions (`simulate_distributed`: `clipped_gradient_step`, the masked release's clip, quantization and noise, the
secure sum's decoding); the table comes from the real deployment.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.data import SiteData
from agent.dpsgd import clipped_gradient_step
from agent.privacy import _masked
from agent.privacy_policy import PrivacyPolicy, plan_privacy, secure_quantization
from aggregator.runner import initial_weights
from bench.federated import example_job, run_jobs, score
from bench.privacy_record import CHOSEN, record_job
from bench.privacy_utility import DELTA, held_out_sites
from federation.jobs import JobSpec
from federation.models import build_model, get_weights, set_weights
from federation.secagg import quantize
from federation.secagg.accounting import secure_epsilons
from federation.secagg.job import divisor
from federation.secagg.masking import MODULUS


@dataclass(frozen=True)
class DistributedConfig:
    rounds: int = 20
    learning_rate: float = 4.0
    record_clip_norm: float = 0.5
    batch_size: int = 512  # the gradient sum's scale, −lr/b: sized so a site's update stays within clip_norm 1
    threshold: int = 4

    def text(self) -> str:
        return (f"{self.rounds} rounds × one full-batch step, lr {self.learning_rate:g}, record clip "
                f"{self.record_clip_norm:g}, scale lr/{self.batch_size}, t = {self.threshold} of 4")


def distributed_job(eps: float, cfg: DistributedConfig, seed: int) -> dict[str, Any]:
    return example_job(
        name=f"privacy-utility-distributed-eps{eps:g}", seed=seed, rounds=cfg.rounds, min_sites=cfg.threshold,
        model={"name": "logreg", "init": "zeros"},
        hyperparameters={"epochs": 1, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size},
        privacy={"unit": "record", "record_noise": "distributed", "target_epsilon": eps,
                 "record_clip_norm": cfg.record_clip_norm, "clip_norm": 1.0, "delta": DELTA},
        secure_aggregation={"threshold": cfg.threshold},
    )


def simulate_distributed(spec: JobSpec, data: dict[str, SiteData], policy: PrivacyPolicy) -> float:
    """One job in-process as the agents and the aggregator compute it (masks left out: they cancel in the sum);
    returns the pooled AUC."""
    weights = initial_weights(spec)
    plan = plan_privacy(spec, policy, None)
    q = plan.quantization
    assert q is not None
    records = {site: d.n_train for site, d in data.items()}
    for _ in range(spec.rounds):
        total = np.zeros(q.dim, dtype=np.int64)
        for d in data.values():
            local = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
            set_weights(local, weights)
            clipped_gradient_step(local, d.x_train, d.y_train, spec)
            after = get_weights(local)
            total = (total + _masked({k: after[k] - weights[k] for k in weights}, plan, lambda v: v)) % MODULUS
        step = quantize.unflatten(quantize.decode_sum(total, q, 1) / divisor(spec, records, list(records)), weights)
        weights = {k: weights[k] + step[k] for k in weights}
    return score(weights, spec, data)[1]


def search_distributed(console: Console, eps: float, repeats: int) -> None:
    """The in-process grid that chose `DistributedConfig` (rounds, learning rate, per-record clip; t = 4)."""
    from fedsilo.local import example_policy

    policy = PrivacyPolicy.model_validate(example_policy("cleveland", {"heart-disease": Path("unused.csv")})["privacy"])
    grid = [DistributedConfig(r, lr, c) for r, lr, c in itertools.product([10, 20, 30], [2.0, 4.0, 6.0], [0.3, 0.5])]
    data = held_out_sites(JobSpec.model_validate(distributed_job(eps, grid[0], 0)))
    table = Table(title=f"in-process search, noise in the secure sum, per-patient target ε {eps:g} (δ {DELTA:g}), "
                        f"{repeats} runs each")
    for col in ("config", "σ", "pooled AUC mean", "sd"):
        table.add_column(col, justify="left" if col == "config" else "right")
    rows = []
    for cfg in grid:
        spec = JobSpec.model_validate(distributed_job(eps, cfg, 0))
        aucs = [simulate_distributed(spec, data, policy) for _ in range(repeats)]
        rows.append((statistics.mean(aucs), statistics.pstdev(aucs), cfg, spec.privacy.record_noise_multiplier))
    for mean, sd, cfg, sigma in sorted(rows, key=lambda r: -r[0]):
        table.add_row(cfg.text(), f"{sigma:.2f}", f"{mean:.3f}", f"{sd:.3f}")
    console.print(table)


def measure_distributed(console: Console, targets: list[float], seeds: int,
                        configs: tuple[DistributedConfig, ...] = (DistributedConfig(), DistributedConfig(threshold=3)),
                        with_local: bool = True) -> None:
    """Distributed noise at each target and threshold, beside the local DP-SGD job (the example's) at the same
    targets unless `with_local` is off (the per-patient table has those rows already), on the real deployment."""
    jobs: dict[str, dict[str, Any]] = {}
    for eps in targets:
        for seed in range(seeds):
            for cfg in configs:
                jobs[f"t{cfg.threshold}/{eps:g}/{seed}"] = distributed_job(eps, cfg, seed)
            if with_local:
                jobs[f"local/{eps:g}/{seed}"] = record_job(eps, CHOSEN, seed)
    t0 = time.monotonic()
    results = {r.label: r for r in run_jobs(jobs)}
    wall = time.monotonic() - t0
    table = Table(title=f"Per patient record (δ {DELTA:g}): noise in the secure sum against each site's own DP-SGD, "
                        f"pooled-validation AUC on the real deployment, {seeds} seeds each")
    for col in ("unit", "target ε", "where the noise is", "σ", "ε reported (max)", "ε if the others collude",
                "pooled AUC mean ± sd", "jobs finished"):
        table.add_column(col, justify="left" if col in ("unit", "where the noise is") else "right")
    for eps in targets:
        rows = [(f"t{c.threshold}", f"secure sum, {c.text()}") for c in configs]
        if with_local:
            rows.append(("local", f"each site's DP-SGD, {CHOSEN.text()}"))
        for key, words in rows:
            runs = [results[f"{key}/{eps:g}/{seed}"] for seed in range(seeds)]
            spec = JobSpec.model_validate(jobs[f"{key}/{eps:g}/0"])
            sigma = f"{spec.privacy.record_noise_multiplier:.2f}" if key != "local" else "each site's own"
            spent = [e for r in runs for e in r.epsilon.values() if e is not None]
            q = secure_quantization(spec)
            alone = [secure_epsilons(q, spec.rounds, spec.privacy.delta)[1]] if q is not None else []
            aucs = [r.pooled_auc for r in runs]
            table.add_row("per patient", f"{eps:g}", words, sigma, f"{max(spent):.3f}" if spent else "—",
                          f"{max(alone):.2f}" if alone else "—",
                          f"{statistics.mean(aucs):.3f} ± {statistics.pstdev(aucs):.3f}",
                          f"{sum(r.state == 'finished' for r in runs)}/{seeds}")
    console.print(table)
    console.print(f"{len(jobs)} jobs in {wall:.0f} s; ε as the agents reported it (for the sum of ≥ t sites' noise; "
                  "'if the others collude': a site's own share alone).")
