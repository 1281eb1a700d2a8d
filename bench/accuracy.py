"""Accuracy benchmark: fedsilo on the four UCI centers against centralized and single-site training.

Run: `make bench` or `.venv/bin/python -m bench.accuracy`. Prints one table; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.baselines import centralized_and_local
from bench.federated import FederatedResult, example_job, run_jobs, site_splits
from federation.jobs import JobSpec
from fedsilo.datasets import SITE_CENTERS, split_by_center

DP_REPEATS = 3  # DP noise differs run to run: report the mean and spread of several runs


def jobs(rounds: int | None) -> dict[str, dict[str, object]]:
    nodp = example_job(privacy={"unit": "site", "noise_multiplier": 0.0, "allow_no_noise": True, "clip_norm": 1000.0})
    out: dict[str, dict[str, object]] = {"fedsilo FedAvg, no noise": nodp}
    for i in range(DP_REPEATS):
        out[f"dp-{i}"] = example_job(seed=i)
    for job in out.values():
        if rounds is not None:
            job["rounds"] = rounds
    return out


def merge_dp(results: list[FederatedResult]) -> FederatedResult:
    """One row for the DP runs: mean AUCs (the pooled one with its standard deviation in the label)."""
    first = results[0]
    pooled = [r.pooled_auc for r in results]
    return FederatedResult(
        label=f"fedsilo FedAvg, demo DP default, {len(results)} runs, pooled sd {statistics.pstdev(pooled):.3f}",
        job_id=first.job_id, state=first.state,
        site_auc={s: statistics.mean(r.site_auc[s] for r in results) for s in first.site_auc},
        pooled_auc=statistics.mean(pooled), epsilon=first.epsilon,
        wall_s=statistics.mean(r.wall_s for r in results),
        seconds_per_round=statistics.median(r.seconds_per_round for r in results),
        http_bytes_per_site_round=statistics.mean(r.http_bytes_per_site_round for r in results), rounds=first.rounds,
        epsilon_unit=first.epsilon_unit,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench accuracy", description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="override the example job's rounds")
    args = parser.parse_args(argv)
    console = Console(width=200)

    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-accuracy-"))
    files = split_by_center(tmp / "data")
    spec = JobSpec.model_validate(example_job())
    data = site_splits(files, spec)
    t0 = time.monotonic()
    baselines = centralized_and_local(data)
    base_wall = time.monotonic() - t0
    runs = run_jobs(jobs(args.rounds), tmp / "fed")
    results = [runs[0], merge_dp(runs[1:])]

    sites = list(SITE_CENTERS)
    table = Table(title="Validation AUC on the four UCI centers (per-center stratified 2/3–1/3 split, seed 42)")
    for col in ("method", *sites, "pooled", "max ε (δ=1e-5)", "wall s", "s/round", "HTTP B/site/round"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for b in baselines:
        table.add_row(b.label, *(f"{b.site_auc[s]:.3f}" for s in sites), f"{b.pooled_auc:.3f}", "—",
                      f"{base_wall:.1f}", "", "")
    for r in results:
        eps = [e for e in r.epsilon.values() if e is not None]
        unit = {"record": "per patient", "site": "per site"}[r.epsilon_unit]
        eps_text = "∞ (no noise)" if not eps else f"{max(eps):.2f} {unit}"
        # A job that did not finish scores the initial model: say so rather than print its AUC as a result.
        state = "" if r.state == "finished" else f" [{r.state.upper()}: see the aggregator log]"
        table.add_row(
            f"{r.label} ({r.rounds} rounds){state}", *(f"{r.site_auc[s]:.3f}" for s in sites), f"{r.pooled_auc:.3f}",
            eps_text, f"{r.wall_s:.1f}",
            f"{r.seconds_per_round:.3f}" if not math.isnan(r.seconds_per_round) else "—",
            f"{r.http_bytes_per_site_round:.0f}",
        )
    console.print(table)
    central = baselines[0].pooled_auc
    best_single = max(b.pooled_auc for b in baselines[1:])
    console.print(f"no-noise gap to centralized: {results[0].pooled_auc - central:+.4f} AUC (acceptance: within 0.01)")
    console.print(f"DP default vs best single site: {results[1].pooled_auc - best_single:+.4f} AUC")


if __name__ == "__main__":
    main()
