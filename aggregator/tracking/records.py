"""What a job's summary becomes in experiment tracking: runs, parameters, per-round metrics, the end of runs.

A pure function of the summary, so it can be replayed: the hub calls it after every round and at the end (the
outbox drops records it already holds, by key), and `fedsilo report` replays it to rebuild the local files.
Per-site runs exist only for sites whose every update said `share_tracking` (their policy allows it), and
carry only what those updates carried: sample count, training loss, validation AUC and ε.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aggregator.tracking.sink import Param, Record, RunRef

ENDED = ("finished", "failed", "cancelled")
AGGREGATOR_RUN = "aggregator"


def experiment_name(prefix: str, job_id: str) -> str:
    """Unique per job (job ids are unique). SageMaker lower-cases experiment names and allows only letters, digits
    and hyphens (`[a-zA-Z0-9](-*[a-zA-Z0-9]){0,119}`), so map anything else to a hyphen here."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{job_id}".lower()).strip("-")[:120].rstrip("-")


def job_prefix(spec: dict[str, Any], default: str) -> str:
    """A job's own `tags.experiment` (set by `fedsilo job import-fedml` from `sm_experiment_name`) wins over the
    aggregator's configured prefix, so a migrated job keeps logging under the experiment name its team knows."""
    tag = (spec.get("tags") or {}).get("experiment")
    return tag if isinstance(tag, str) and tag.strip() else default


def site_run(site: str) -> str:
    return f"client-{site}"


def sharing_sites(summary: dict[str, Any]) -> list[str]:
    """Sites that sent updates and said `share_tracking` in every one of them."""
    said: dict[str, bool] = {}
    for entry in summary["training"]:
        for site, info in entry["sites"].items():
            said[site] = said.get(site, True) and bool(info.get("share_tracking", False))
    return sorted(s for s, ok in said.items() if ok)


def job_params(spec: dict[str, Any]) -> dict[str, Param]:
    params: dict[str, Param] = {
        "job_name": spec["name"],
        "purpose": spec["purpose"],
        "dataset": spec["dataset"]["name"],
        "model": spec["model"]["name"],
        "rounds": spec["rounds"],
        "min_sites": spec["min_sites"],
        "sites_invited": len(spec["sites"]),  # a count: which hospitals took part is theirs to share
        "aggregation": spec["aggregation"],
        "server_learning_rate": spec["server_learning_rate"],
        "seed": spec["seed"],
    }
    return params | client_params(spec)


def client_params(spec: dict[str, Any]) -> dict[str, Param]:
    """The training set-up every site ran with (identical at all sites: it is the job's)."""
    hp, privacy = spec["hyperparameters"], spec["privacy"]
    return {
        "learning_rate": hp["learning_rate"],
        "batch_size": hp["batch_size"],
        "client_optimizer": hp["optimizer"],
        "weight_decay": hp["weight_decay"],
        "local_epochs": hp["epochs"],
        "dp_unit": privacy["unit"],
        "dp_clip_norm": privacy["clip_norm"],
        "dp_noise_multiplier": privacy["noise_multiplier"],
        "dp_delta": privacy["delta"],
    }


def records_for(summary: dict[str, Any], prefix: str, report_dir: Path | None = None) -> list[Record]:
    """Every record the summary implies so far (keys are stable, so repeating a call adds nothing new)."""
    job_id = summary["job_id"]
    exp = experiment_name(job_prefix(summary["spec"], prefix), job_id)
    agg = RunRef(job_id=job_id, experiment=exp, name=AGGREGATOR_RUN)
    out = [Record(key=f"{AGGREGATOR_RUN}|params", run=agg, kind="params", params=job_params(summary["spec"]))]
    for h in summary["history"]:
        g = h["global"]
        if not h["complete"] or g is None:  # the weighted mean moves until every site's evaluation is in
            continue
        for name, value in (("Test:AUC", g["auc"]), ("Test:Loss", g["loss"])):
            if value is not None:
                out.append(Record(key=f"{AGGREGATOR_RUN}|{name}|{h['round']}", run=agg, kind="metric", name=name,
                                  value=float(value), step=h["round"]))
    ended = summary["state"] in ENDED
    shared = sharing_sites(summary)
    for site in shared:
        run = RunRef(job_id=job_id, experiment=exp, name=site_run(site))
        base = client_params(summary["spec"]) | {"center": site}
        for entry in summary["training"]:
            info = entry["sites"].get(site)
            if info is None:
                continue
            params = base | {"train_data_size": info["num_samples"]}
            if info["epsilon"] is not None:
                params["epsilon"] = float(info["epsilon"])
                params["epsilon_unit"] = summary["spec"]["privacy"].get("unit", "site")  # record: per patient
            out.append(Record(key=f"{run.name}|params|{entry['round']}", run=run, kind="params", params=params))
            out.append(Record(key=f"{run.name}|Training:Loss|{entry['round']}", run=run, kind="metric",
                              name="Training:Loss", value=float(info["train_loss"]), step=entry["round"]))
        for h in summary["history"]:
            m = h["sites"].get(site)
            if m is not None and m["auc"] is not None:
                out.append(Record(key=f"{run.name}|Validation:AUC|{h['round']}", run=run, kind="metric",
                                  name="Validation:AUC", value=float(m["auc"]), step=h["round"]))
        if ended:
            out.append(Record(key=f"{run.name}|end", run=run, kind="end", status=summary["state"]))
    if ended:
        model = report_dir / job_id / "model.safetensors" if report_dir is not None else None
        if model is not None and model.exists():
            out.append(Record(key=f"{AGGREGATOR_RUN}|artifact|model", run=agg, kind="artifact", name="model",
                              path=str(model)))
        out.append(Record(key=f"{AGGREGATOR_RUN}|params|final", run=agg, kind="params",
                          params={"state": summary["state"], "rounds_completed": summary["round"]}))
        out.append(Record(key=f"{AGGREGATOR_RUN}|end", run=agg, kind="end", status=summary["state"]))
    return out
