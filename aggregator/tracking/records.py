"""What a job becomes in experiment tracking: runs, parameters, per-round metrics, the end of runs.

Pure functions, so they can be replayed: after each round the hub queues what that round adds (`round_records`,
O(sites)); when a job ends it queues everything its summary implies (`records_for`; the outbox drops records it
already holds, by key), and `fedsilo report` replays the latter to rebuild the local files.
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


def experiment_name(prefix: str | None, job_id: str) -> str:
    """Unique per job (job ids are unique, and start with the job's name). SageMaker lower-cases experiment names
    and allows only letters, digits and hyphens (`[a-zA-Z0-9](-*[a-zA-Z0-9]){0,119}`), so map anything else to a
    hyphen here."""
    name = f"{prefix}-{job_id}" if prefix else job_id
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:120].rstrip("-")


def job_prefix(spec: dict[str, Any], default: str | None) -> str | None:
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


def site_round_records(run: RunRef, base: dict[str, Param], rnd: int, info: dict[str, Any]) -> list[Record]:
    """What a site's update of round `rnd` adds to its run: the round's parameters (sample count, ε) and its
    training loss."""
    params = base | {"train_data_size": info["num_samples"]}
    if info["epsilon"] is not None:
        params["epsilon"] = float(info["epsilon"])
        params["epsilon_unit"] = base.get("dp_unit", "site")  # record: per patient
    return [
        Record(key=f"{run.name}|params|{rnd}", run=run, kind="params", params=params),
        Record(key=f"{run.name}|Training:Loss|{rnd}", run=run, kind="metric", name="Training:Loss",
               value=float(info["train_loss"]), step=rnd),
    ]


def site_eval_record(run: RunRef, version: int, auc: float | None) -> list[Record]:
    if auc is None:
        return []
    return [Record(key=f"{run.name}|Validation:AUC|{version}", run=run, kind="metric", name="Validation:AUC",
                   value=float(auc), step=version)]


def global_records(agg: RunRef, version: int, g: dict[str, Any]) -> list[Record]:
    return [
        Record(key=f"{AGGREGATOR_RUN}|{name}|{version}", run=agg, kind="metric", name=name, value=float(value),
               step=version)
        for name, value in (("Test:AUC", g["auc"]), ("Test:Loss", g["loss"])) if value is not None
    ]


def aggregator_run(spec: dict[str, Any], prefix: str | None, job_id: str) -> RunRef:
    """The job's aggregator run (site runs are `RunRef(..., name=site_run(site))` in the same experiment)."""
    exp = experiment_name(job_prefix(spec, prefix), job_id)
    return RunRef(job_id=job_id, experiment=exp, name=AGGREGATOR_RUN)


def round_records(
    job_id: str, spec: dict[str, Any], prefix: str | None, rnd: int, sites: dict[str, dict[str, Any]],
    evaluations: dict[str, dict[str, Any]], global_metrics: dict[str, Any] | None, withheld: set[str],
) -> list[Record]:
    """The records one closed round adds, in O(sites of that round): the job's parameters (queued once, by key),
    model version `rnd - 1`'s global metrics (complete now), and for each site that shares tracking (and never
    withheld it in this job: `withheld` is updated in place) its update of round `rnd` and its evaluation of
    version `rnd - 1`. `sites` holds what `job_summary`'s `training` entry holds for the round."""
    agg = aggregator_run(spec, prefix, job_id)
    out = [Record(key=f"{AGGREGATOR_RUN}|params", run=agg, kind="params", params=job_params(spec))]
    if global_metrics is not None:
        out += global_records(agg, rnd - 1, global_metrics)
    withheld.update(site for site, info in sites.items() if not info.get("share_tracking", False))
    base = client_params(spec)
    for site in sorted(set(sites) | set(evaluations)):
        if site in withheld:
            continue
        run = agg.model_copy(update={"name": site_run(site)})
        if site in sites:
            out += site_round_records(run, base | {"center": site}, rnd, sites[site])
        if site in evaluations:
            out += site_eval_record(run, rnd - 1, evaluations[site].get("auc"))
    return out


def records_for(summary: dict[str, Any], prefix: str | None, report_dir: Path | None = None) -> list[Record]:
    """Every record the whole summary implies (keys are stable, so repeating a call adds nothing new). Costs
    O(rounds × sites): the hub calls it once when a job ends (and for each running job at start-up) to catch
    anything a crash kept `round_records` from queueing; `fedsilo report` replays it into the local files."""
    job_id = summary["job_id"]
    agg = aggregator_run(summary["spec"], prefix, job_id)
    out = [Record(key=f"{AGGREGATOR_RUN}|params", run=agg, kind="params", params=job_params(summary["spec"]))]
    for h in summary["history"]:
        if h["complete"] and h["global"] is not None:  # the weighted mean moves until every site's evaluation is in
            out += global_records(agg, h["round"], h["global"])
    ended = summary["state"] in ENDED
    for site in sharing_sites(summary):
        run = agg.model_copy(update={"name": site_run(site)})
        base = client_params(summary["spec"]) | {"center": site}
        for entry in summary["training"]:
            if site in entry["sites"]:
                out += site_round_records(run, base, entry["round"], entry["sites"][site])
        for h in summary["history"]:
            m = h["sites"].get(site)
            if m is not None:
                out += site_eval_record(run, h["round"], m["auc"])
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
