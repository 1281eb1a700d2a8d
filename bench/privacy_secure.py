"""Privacy–utility with secure aggregation, on the real deployment: the same jobs with and without
`secure_aggregation`, side by side, per unit.

Site unit: under secure aggregation each site adds only its share of the update-level noise (σ/√t with t the
threshold, docs/secure-aggregation.md), so the sum carries the job's σ once, as a trusted server's central noise
would, while the aggregator sees no single update. Rows for the default threshold (3 of 4: one site may drop) and
for t = 4 (no dropout tolerated, each site σ/2). The per-site ε is the same in every row: with secure aggregation it
holds for the sum of at least t sites' noise; the ε that one site's own share guarantees alone (should the other
three collude with the aggregator) is printed beside it. Record unit: DP-SGD as without secure aggregation, each
update quantized and masked; the per-patient ε is unchanged.

    python -m bench privacy-utility --secure                 # site ε 8 (two configurations), record ε 1
    python -m bench privacy-utility --secure --seeds 3
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.federated import FederatedResult, run_jobs
from bench.privacy_record import CHOSEN as RECORD_CHOSEN
from bench.privacy_record import record_job
from bench.privacy_utility import CHOSEN, DELTA, LEAN, job_for
from federation.jobs import JobSpec
from federation.models import build_model, get_weights
from federation.secagg.accounting import secure_epsilons
from federation.secagg.job import job_quantization, model_dim

SITE_TARGET = 8.0
RECORD_TARGET = 1.0
# (label, secure_aggregation value): the job without it, then with the default threshold and with all four sites.
VARIANTS: list[tuple[str, Any]] = [("without", None), ("secure, t = 3 of 4", {"threshold": 3}),
                                   ("secure, t = 4 of 4", {"threshold": 4})]


def _with(job: dict[str, Any], secure: Any) -> dict[str, Any]:
    """`job` with secure aggregation at a threshold (and min_sites no higher: a round may then lose a site)."""
    if secure is None:
        return job
    return {**job, "secure_aggregation": secure, "min_sites": min(job["min_sites"], secure["threshold"])}


def site_job(seed: int, lean: bool = False) -> dict[str, Any]:
    """The site unit's chosen configuration at ε 8 from a public all-zero start (the what-if's best), or the lean
    one (six literature features, the published prior, one round)."""
    return job_for(SITE_TARGET, LEAN[SITE_TARGET] if lean else replace(CHOSEN[SITE_TARGET], init="zeros"), seed)


def epsilon_alone(job: dict[str, Any]) -> float | None:
    spec = JobSpec.model_validate(job)
    if spec.secure_aggregation is None:
        return None
    dim = model_dim(get_weights(build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)))
    return secure_epsilons(job_quantization(spec, dim), spec.rounds, spec.privacy.delta)[1]


def measure_secure(console: Console, seeds: int) -> None:
    jobs: dict[str, dict[str, Any]] = {}
    for label, secure in VARIANTS:
        for seed in range(seeds):
            jobs[f"site/{label}/{seed}"] = _with(site_job(seed), secure)
            jobs[f"lean/{label}/{seed}"] = _with(site_job(seed, lean=True), secure)
    for label, secure in VARIANTS[:2]:
        for seed in range(seeds):
            jobs[f"record/{label}/{seed}"] = _with(record_job(RECORD_TARGET, RECORD_CHOSEN, seed), secure)
    t0 = time.monotonic()
    results = {r.label: r for r in run_jobs(jobs)}
    wall = time.monotonic() - t0
    table = Table(title=f"Secure aggregation on the real deployment: pooled-validation AUC, {seeds} seeds per row "
                        f"(δ {DELTA:g})")
    for col in ("unit", "target ε", "secure aggregation", "ε spent (max over sites)", "ε of one site's noise alone",
                "pooled AUC mean ± sd", "s/round (median)", "jobs finished"):
        table.add_column(col, justify="left" if col in ("unit", "secure aggregation") else "right")
    for key, unit, target, variants in (("site", "per site", SITE_TARGET, VARIANTS),
                                        ("lean", "per site, lean", SITE_TARGET, VARIANTS),
                                        ("record", "per patient", RECORD_TARGET, VARIANTS[:2])):
        for label, _ in variants:
            runs: list[FederatedResult] = [results[f"{key}/{label}/{seed}"] for seed in range(seeds)]
            spent = [e for r in runs for e in r.epsilon.values() if e is not None]
            alone = epsilon_alone(jobs[f"{key}/{label}/0"]) if key != "record" else None
            aucs = [r.pooled_auc for r in runs]
            table.add_row(unit, f"{target:g}", label, f"{max(spent):.3f}" if spent else "—",
                          f"{alone:.2f}" if alone is not None else "—",
                          f"{statistics.mean(aucs):.3f} ± {statistics.pstdev(aucs):.3f}",
                          f"{statistics.median(r.seconds_per_round for r in runs):.3f}",
                          f"{sum(r.state == 'finished' for r in runs)}/{seeds}")
    console.print(table)
    console.print(f"{len(jobs)} jobs in {wall:.0f} s. Site unit: {CHOSEN[SITE_TARGET].text()}, all-zero start; "
                  f"lean: {LEAN[SITE_TARGET].text()}; record unit: {RECORD_CHOSEN.text()}.")
