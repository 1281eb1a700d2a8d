"""A job's report on disk: metrics JSON/CSV, PNG plots, a self-contained HTML report and the final model.

Written once, when the job ends, by the aggregator's job-event worker (`aggregator.jobevents`), or again by
`fedsilo report`. Every site stays in metrics.json and metrics.csv; the plots and the HTML page summarize a large
federation instead of drawing a line or a column per site (`aggregator.plots`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator import plots
from aggregator.blobs import BlobStore
from aggregator.store import StateStore
from aggregator.summary import job_summary

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.tracking.sink import Record


def write_report(store: StateStore, blobs: BlobStore, job_id: str, out_root: Path) -> dict[str, Any]:
    """Write `<out_root>/<job_id>/`; returns the job's summary it was written from (KeyError: no such job)."""
    summary = job_summary(store, job_id)
    if summary is None:
        raise KeyError(job_id)
    write_files(summary, blobs, out_root)
    return summary


def write_files(summary: dict[str, Any], blobs: BlobStore, out_root: Path) -> Path:
    """metrics.json, metrics.csv, the PNG plots, report.html and model.safetensors of one job's summary."""
    out: Path = out_root / summary["job_id"]
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
    _atomic_write(out / "metrics.png", plots.plot_combined(summary))
    _atomic_write(out / "model.safetensors", blobs.get(summary["model_sha256"]))
    write_html_report(summary, out)
    return out


def write_html_report(summary: dict[str, Any], out: Path) -> Path:
    """`curves-global.png`, `curves-sites.png` and the self-contained `report.html` (plots inlined)."""
    from aggregator.tracking.html import render

    figures = {
        "Global model: sample-weighted validation AUC and loss per round": plots.plot_global(summary),
        "Each site: validation AUC and loss of the global model per round": plots.plot_sites(summary),
    }
    for name, png in zip(("curves-global.png", "curves-sites.png"), figures.values(), strict=True):
        _atomic_write(out / name, png)
    _atomic_write(out / "report.html", render(summary, figures).encode())
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
        summary = write_report(store, open_blobs(cfg.blob_url, cfg.blob_s3), job_id, cfg.report_dir)
    finally:
        store.close()
    if cfg.tracking.local.enabled:
        records = records_for(summary, cfg.tracking.experiment_prefix, cfg.report_dir)
        sink = LocalSink(cfg.report_dir)
        runs: dict[str, list[Record]] = {}
        for r in records:
            runs.setdefault(r.run.name, []).append(r)
        for recs in runs.values():
            deliver(sink, recs[0].run, recs)
        sink.write_params(job_id)
    return cfg.report_dir / job_id


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
