"""A job's summary: everything an operator sees about it (the API's job status, the report, tracking's replay).

Built from five queries whatever the number of rounds and sites (the job, its rounds, all its updates, all its
evaluations, its decisions), never one query per round.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aggregator.runner import ACTIVE, weighted
from aggregator.store import StateStore


def job_summary(store: StateStore, job_id: str, per_site: bool = True) -> dict[str, Any] | None:
    """History entry r describes global model version r (version 0 is the initial model), evaluated by the sites on
    their validation splits. With `per_site` False the per-site detail (each history entry's `sites`, `training`,
    each site's reasons) is left out and counted instead: a status poll of a thousand-site job stays small."""
    job = store.get_job(job_id)
    if job is None:
        return None
    rounds = {r.round: r for r in store.rounds(job_id)}
    evals = store.evaluations(job_id)
    decisions = store.decisions(job_id)
    unit = job.spec.privacy.unit
    epsilon: dict[str, float | None] = {}
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for u in store.updates(job_id):
        epsilon[u.site] = u.epsilon
        by_round.setdefault(u.round, {})[u.site] = {
            "train_loss": u.train_loss, "num_samples": u.num_samples, "epsilon": u.epsilon,
            "share_tracking": u.share_tracking,
        }
    history = []
    for version in sorted(set(evals) | {r for r in rounds if rounds[r].kind == "train"}):
        rnd = rounds.get(version)
        per = evals.get(version, {})
        g = weighted(per) if per else None
        nxt = rounds.get(version + 1)
        history.append({
            "round": version,
            # Model version r is evaluated with round r+1's updates (or by the final evaluation round):
            # its metrics are complete once that round has closed.
            "complete": nxt is not None and nxt.state == "closed",
            "sites_reporting": rnd.n_sites if rnd else None,
            "sites_evaluated": len(per),
            "samples": rnd.n_samples if rnd else None,
            "train_loss": rnd.train_loss if rnd else None,
            "duration_s": (rnd.closed_at - rnd.started_at) if rnd and rnd.closed_at else None,
            "global": g.model_dump() if g else None,
            "sites": {s: m.model_dump() for s, m in per.items()} if per_site else {},
        })
    eps = [e for e in epsilon.values() if e is not None]
    out: dict[str, Any] = {
        "job_id": job.job_id,
        "name": job.spec.name,
        "state": job.state,
        "paused": job.paused,
        "reason": job.reason,
        "requester": job.requester,
        "round": min(job.round, job.spec.rounds),
        "rounds": job.spec.rounds,
        "min_sites": job.spec.min_sites,
        "model_sha256": job.model_sha,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "decisions": dict(Counter(d.decision for d in decisions)),
        "epsilon_max": max(eps) if eps else None,  # in the job's unit
        "privacy": {"unit": unit, "unit_words": job.spec.privacy.unit_words, "delta": job.spec.privacy.delta},
        # Once the job ended: "pending" until its report is written and its tracking queued, then "written".
        "report": None if job.state in ACTIVE else ("pending" if store.followup_pending(job_id) else "written"),
        "history": history,
        "rejections": store.rejections(job_id, limit=100),
        "spec": job.spec.model_dump(mode="json"),
    }
    if per_site:
        by_unit = store.site_spend(job_id)
        # `epsilon` is in the job's unit (`privacy.unit`); `epsilon_by_unit` has every unit a site reported.
        out["sites"] = {
            d.site: {"decision": d.decision, "reasons": d.reasons, "epsilon": epsilon.get(d.site),
                     "epsilon_unit": unit,
                     "epsilon_by_unit": by_unit.get(d.site, {unit: epsilon[d.site]} if d.site in epsilon else {})}
            for d in decisions
        }
        # Per training round, what each site reported with its update (local training loss, sample count, ε).
        out["training"] = [{"round": r, "sites": sites} for r, sites in sorted(by_round.items())]
    return out

