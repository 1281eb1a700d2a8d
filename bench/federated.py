"""Run a job on a real local federation (broker, aggregator, one agent process per center) for benchmarks,
and score its final model on every site's validation split and on the pooled validation set."""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score

from agent.data import SiteData, load_site_data
from federation.jobs import JobSpec
from federation.models import Weights, build_model, set_weights
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease.yaml"
START_TIMEOUT_S = 600.0


def example_job(**overrides: Any) -> dict[str, Any]:
    """The example job with `overrides` merged into its sections, except `privacy`, which replaces the example's
    whole (a record-level block and a site-level one do not mix; without `unit` it is the site unit)."""
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "privacy":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@dataclass
class FederatedResult:
    label: str
    job_id: str
    state: str
    site_auc: dict[str, float]
    pooled_auc: float
    epsilon: dict[str, float | None]
    wall_s: float
    seconds_per_round: float
    http_bytes_per_site_round: float
    rounds: int
    epsilon_unit: str = "site"  # record: ε per patient record; site: ε per hospital dataset
    global_auc: float = float("nan")  # the sites' sample-weighted validation AUC of the final model (the demo's)


def site_splits(files: dict[str, Path], spec: JobSpec) -> dict[str, SiteData]:
    return {s: load_site_data(p, spec.features, spec.dataset) for s, p in files.items()}


def score(weights: Weights, spec: JobSpec, data: dict[str, SiteData]) -> tuple[dict[str, float], float]:
    """Validation AUC of `weights` at each site and over all sites' validation rows pooled."""
    model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
    set_weights(model, weights)
    model.eval()
    per_site, ys, ps = {}, [], []
    with torch.no_grad():
        for site, d in data.items():
            p = model(torch.from_numpy(d.x_val)).squeeze(-1).numpy()
            per_site[site] = float(roc_auc_score(d.y_val, p))
            ys.append(d.y_val)
            ps.append(p)
    return per_site, float(roc_auc_score(np.concatenate(ys), np.concatenate(ps)))


def _counter(metrics_text: str, name: str) -> float:
    m = re.search(rf"^{name}_total (\S+)$", metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def bench_policies(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The example policies, opened up so that the noise-free ceiling can be measured: no noise floor, no clip
    ceiling, no ε cap."""
    policies = {}
    for site, path in files.items():
        policy = example_policy(site, {"heart-disease": path})
        policy["privacy"]["min_noise_multiplier"] = 0.0
        policy["privacy"]["max_clip_norm"] = math.inf
        policy["privacy"]["max_epsilon_per_job"] = math.inf
        policy["privacy"]["budgets"]["heart-disease"]["epsilon"] = math.inf
        policy["operations"]["max_concurrent_jobs"] = 10
        policies[site] = policy
    return policies


def run_jobs(jobs: dict[str, dict[str, Any]], workdir: Path | None = None) -> list[FederatedResult]:
    """Run each labelled job in turn on one federation of the four centers."""
    root = workdir or Path(tempfile.mkdtemp(prefix="fedsilo-bench-"))
    files = split_by_center(root / "data")
    results = []
    fed = LocalFederation(root, bench_policies(files), log_level="WARNING")
    try:
        # Four agents and an aggregator each import PyTorch: on a shared, loaded machine that can take minutes.
        fed.start(timeout=START_TIMEOUT_S)
        for label, job in jobs.items():
            spec = JobSpec.model_validate(job)
            before = fed.client.request("GET", "/metrics").decode()
            t0 = time.monotonic()
            job_id = fed.client.submit(yaml.safe_dump(job))
            summary = fed.wait_job(job_id, timeout=1800)
            wall = time.monotonic() - t0
            after = fed.client.request("GET", "/metrics").decode()
            moved = sum(_counter(after, n) - _counter(before, n)
                        for n in ("fedsilo_http_received_bytes", "fedsilo_http_sent_bytes"))
            model = decode(fed.client.request("GET", f"/api/v1/jobs/{job_id}/model"))
            per_site, pooled = score(model, spec, site_splits(files, spec))
            closed = [h for h in summary["history"] if h["duration_s"] is not None and h["round"] > 0]
            results.append(FederatedResult(
                label=label, job_id=job_id, state=summary["state"], site_auc=per_site, pooled_auc=pooled,
                epsilon={s: v["epsilon"] for s, v in summary["sites"].items()}, wall_s=wall,
                seconds_per_round=float(np.median([h["duration_s"] for h in closed])) if closed else float("nan"),
                http_bytes_per_site_round=moved / max(1, len(files) * spec.rounds), rounds=spec.rounds,
                epsilon_unit=spec.privacy.unit,
                global_auc=float((summary["history"][-1]["global"] or {}).get("auc") or float("nan")),
            ))
    finally:
        fed.stop()
    return results
