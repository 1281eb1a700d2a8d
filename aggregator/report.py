"""A job's summary (served by the API) and its report on disk: metrics JSON/CSV, PNG plots, a self-contained HTML
report and the final model."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator.blobs import BlobStore
from aggregator.engine import weighted
from aggregator.store import StateStore

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.tracking.sink import Record


def job_summary(store: StateStore, job_id: str) -> dict[str, Any] | None:
    """Everything an operator sees about a job. History entry r describes global model version r
    (version 0 is the initial model), evaluated by the sites on their validation splits."""
    job = store.get_job(job_id)
    if job is None:
        return None
    rounds = {r.round: r for r in store.rounds(job_id)}
    evals = store.evaluations(job_id)
    decisions = store.decisions(job_id)
    by_unit = store.site_spend(job_id)
    unit = job.spec.privacy.unit
    epsilon: dict[str, float | None] = {}
    training = []
    for r in sorted(rounds):
        ups = store.updates(job_id, r)
        for u in ups:
            epsilon[u.site] = u.epsilon
        if ups:
            training.append({"round": r, "sites": {
                u.site: {"train_loss": u.train_loss, "num_samples": u.num_samples, "epsilon": u.epsilon,
                         "share_tracking": u.share_tracking} for u in ups}})
    history = []
    for version in sorted(set(evals) | {r for r in rounds if rounds[r].kind == "train"}):
        rnd = rounds.get(version)
        per_site = evals.get(version, {})
        g = weighted(per_site) if per_site else None
        nxt = rounds.get(version + 1)
        history.append({
            "round": version,
            # Model version r is evaluated with round r+1's updates (or by the final evaluation round):
            # its metrics are complete once that round has closed.
            "complete": nxt is not None and nxt.state == "closed",
            "sites_reporting": rnd.n_sites if rnd else None,
            "samples": rnd.n_samples if rnd else None,
            "train_loss": rnd.train_loss if rnd else None,
            "duration_s": (rnd.closed_at - rnd.started_at) if rnd and rnd.closed_at else None,
            "global": g.model_dump() if g else None,
            "sites": {s: m.model_dump() for s, m in per_site.items()},
        })
    return {
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
        # `epsilon` is in the job's unit (`privacy.unit`); `epsilon_by_unit` has every unit a site reported.
        "privacy": {"unit": unit, "unit_words": job.spec.privacy.unit_words, "delta": job.spec.privacy.delta},
        "sites": {
            d.site: {"decision": d.decision, "reasons": d.reasons, "epsilon": epsilon.get(d.site),
                     "epsilon_unit": unit,
                     "epsilon_by_unit": by_unit.get(d.site, {unit: epsilon[d.site]} if d.site in epsilon else {})}
            for d in decisions
        },
        "history": history,
        # Per training round, what each site reported with its update (local training loss, sample count, ε).
        "training": training,
        "rejections": store.rejections(job_id, limit=100),
        "spec": job.spec.model_dump(mode="json"),
    }


def write_report(store: StateStore, blobs: BlobStore, job_id: str, out_root: Path) -> Path:
    """Write `<out_root>/<job_id>/` with metrics.json, metrics.csv, metrics.png and model.safetensors."""
    summary = job_summary(store, job_id)
    if summary is None:
        raise KeyError(job_id)
    out = out_root / job_id
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "metrics.json", json.dumps(summary, indent=2).encode())
    rows = []
    for h in summary["history"]:
        scopes = [("global", h["global"])] if h["global"] else []
        scopes += list(h["sites"].items())
        for scope, m in scopes:
            rows.append({
                "round": h["round"], "scope": scope, "auc": m["auc"], "loss": m["loss"], "n": m["n"],
                "train_loss": h["train_loss"] if scope == "global" else None,
            })
    tmp = out / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "scope", "auc", "loss", "n", "train_loss"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "metrics.csv")
    _atomic_write(out / "metrics.png", _plot(summary))
    _atomic_write(out / "model.safetensors", blobs.get(summary["model_sha256"]))
    write_html_report(summary, out)
    return out


def write_html_report(summary: dict[str, Any], out: Path) -> Path:
    """`curves-global.png`, `curves-sites.png` and the self-contained `report.html` (plots inlined)."""
    from aggregator.tracking.html import render

    plots = {
        "Global model: sample-weighted validation AUC and loss per round": _plot_global(summary),
        "Each site: validation AUC and loss of the global model per round": _plot_sites(summary),
    }
    for name, png in zip(("curves-global.png", "curves-sites.png"), plots.values(), strict=True):
        _atomic_write(out / name, png)
    _atomic_write(out / "report.html", render(summary, plots).encode())
    return out / "report.html"


def regenerate(cfg: AggregatorConfig, job_id: str) -> Path:
    """Rebuild a job's report folder from the aggregator's state (`fedsilo report JOB_ID`): the report files,
    and the local tracking files replayed from the same records the tracking hub sends."""
    from aggregator.blobs import open_blobs
    from aggregator.store import open_store
    from aggregator.tracking.local import LocalSink
    from aggregator.tracking.records import records_for
    from aggregator.tracking.sink import deliver

    store = open_store(cfg.state_url)
    try:
        out = write_report(store, open_blobs(cfg.blob_url), job_id, cfg.report_dir)
        summary = job_summary(store, job_id)
    finally:
        store.close()
    assert summary is not None
    if cfg.tracking.local.enabled:
        records = records_for(summary, cfg.tracking.experiment_prefix, cfg.report_dir)
        sink = LocalSink(cfg.report_dir)
        runs: dict[str, list[Record]] = {}
        for r in records:
            runs.setdefault(r.run.name, []).append(r)
        for recs in runs.values():
            deliver(sink, recs[0].run, recs)
    return out


def _figure(ncols: int, nrows: int = 1, width: float = 5.5, height: float = 3.8) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def _png(fig: Any, axes: Any) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _plot_global(summary: dict[str, Any]) -> bytes:
    hist = [h for h in summary["history"] if h["global"]]
    fig, axes = _figure(2)
    rounds = [h["round"] for h in hist]
    for ax, key, label in ((axes[0][0], "auc", "AUC"), (axes[0][1], "loss", "BCE loss")):
        ax.plot(rounds, [h["global"][key] for h in hist], "k-o", lw=2, label="global (weighted mean)")
        ax.set(title=f"Global validation {label}", xlabel="round (global model version)", ylabel=label)
    train = [(h["round"], h["train_loss"]) for h in summary["history"] if h["train_loss"] is not None]
    if train:
        axes[0][1].plot([r for r, _ in train], [v for _, v in train], "--", color="grey",
                        label="local training loss (weighted)")
    return _png(fig, axes)


def _plot_sites(summary: dict[str, Any]) -> bytes:
    fig, axes = _figure(2)
    sites = sorted({s for h in summary["history"] for s in h["sites"]})
    for ax, key, label in ((axes[0][0], "auc", "AUC"), (axes[0][1], "loss", "BCE loss")):
        for site in sites:
            pts = [(h["round"], h["sites"][site][key]) for h in summary["history"] if site in h["sites"]]
            ax.plot([r for r, _ in pts], [v for _, v in pts], "-o", ms=3, label=site)
        ax.set(title=f"Validation {label} at each site", xlabel="round (global model version)", ylabel=label)
    return _png(fig, axes)


def _plot(summary: dict[str, Any]) -> bytes:
    """`metrics.png`: per-site and global validation AUC and loss in one figure."""
    hist = [h for h in summary["history"] if h["global"]]
    fig, axes = _figure(2, width=5.5, height=4.0)
    sites = sorted({s for h in hist for s in h["sites"]})
    for ax, key, label in ((axes[0][0], "auc", "AUC"), (axes[0][1], "loss", "BCE loss")):
        for site in sites:
            pts = [(h["round"], h["sites"][site][key]) for h in hist if site in h["sites"]]
            ax.plot([r for r, _ in pts], [v for _, v in pts], alpha=0.5, label=site)
        ax.plot([h["round"] for h in hist], [h["global"][key] for h in hist], "k-o", lw=2,
                label="global (weighted mean)")
        ax.set(title=f"Validation {label} per round", xlabel="round (global model version)", ylabel=label)
    fig.suptitle(f"{summary['name']} ({summary['job_id']})")
    return _png(fig, axes)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
