"""Live per-round table of a job (round, sites reporting, global validation AUC and loss) for the CLI."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedsilo.client import AggregatorClient, AggregatorUnreachableError

ENDED = ("finished", "failed", "cancelled")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for h in summary["history"]:
        g = h["global"]
        if g is None or not (h["complete"] or summary["state"] in ENDED):
            continue
        eps = summary.get("epsilon_max")
        out.append((
            str(h["round"]),
            str(h["sites_evaluated"]),
            _fmt(h["train_loss"]),
            _fmt(g["auc"]),
            _fmt(g["loss"]),
            _fmt(h["duration_s"], 2),
            _fmt(eps, 2) if eps is not None and h["round"] == summary["history"][-1]["round"] else "",
        ))
    return out


def table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"{summary['name']} · {summary['job_id']} · {summary['state']} "
                    f"(round {summary['round']}/{summary['rounds']})")
    unit = {"record": "max ε per patient", "site": "max ε per site"}.get(
        summary.get("privacy", {}).get("unit"), "max ε")
    for col in ("round", "sites", "train loss", "val AUC*", "val loss*", "round s", unit):
        t.add_column(col, justify="right")
    for r in rows(summary):
        t.add_row(*r)
    t.caption = "* global model on each site's validation split, sample-weighted mean over sites"
    return t


def _poll(client: AggregatorClient, job_id: str, patience: float = 30.0, per_site: bool = False) -> dict[str, Any]:
    """The job's summary (without each site's detail unless asked: polls stay small at a thousand sites); an
    aggregator that restarts (it resumes every job) is waited for up to `patience` s."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return client.job(job_id, per_site=per_site)
        except AggregatorUnreachableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def watch(client: AggregatorClient, job_id: str, interval: float = 0.5, timeout: float = 3600) -> dict[str, Any]:
    """Follow a job until it ends; a live table on a terminal, one line per finished round otherwise. Returns the
    full summary, once the job's report is written (it follows the end by moments)."""
    deadline = time.monotonic() + timeout
    summary = _follow(client, job_id, interval, deadline)
    while summary["state"] in ENDED and summary.get("report") == "pending" and time.monotonic() < deadline:
        time.sleep(interval)
        summary = _poll(client, job_id)
    return _poll(client, job_id, per_site=True)


def _follow(client: AggregatorClient, job_id: str, interval: float, deadline: float) -> dict[str, Any]:
    console = Console(stderr=False, soft_wrap=True)
    printed = 0
    summary = _poll(client, job_id, patience=0.0)  # never reached yet: a wrong URL fails at once, not in 30 s
    if sys.stdout.isatty():
        with Live(table(summary), console=console, refresh_per_second=4) as live:
            while summary["state"] not in ENDED and time.monotonic() < deadline:
                time.sleep(interval)
                summary = _poll(client, job_id)
                live.update(table(summary))
        return summary
    print("round  sites  train_loss  val_auc  val_loss  round_s   (val_*: global model on each site's "
          "validation split, sample-weighted mean over sites)", flush=True)
    while True:
        for r in rows(summary)[printed:]:
            print(f"{r[0]:>5}  {r[1]:>5}  {r[2]:>10}  {r[3]:>7}  {r[4]:>8}  {r[5]:>7}", flush=True)
            printed += 1
        if summary["state"] in ENDED or time.monotonic() > deadline:
            return summary
        time.sleep(interval)
        summary = _poll(client, job_id)
