"""How a job ended, in the same words for `fedsilo demo`, `job submit --wait` and `job watch`: state (and why, when
it failed), each site's decision and ε, the final global model's validation AUC and loss, and where the report is.

Printed without wrapping, so that paths stay whole in a file or a pipe.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from federation.jobs import UNIT_WORDS

REPORT_FILES = ("report.html", "metrics.json", "metrics.csv", "metrics.png", "model.safetensors")


def console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def outcome_lines(summary: dict[str, Any], report_dir: Path | None, wall: float | None = None,
                  aggregator: str | None = None) -> list[str]:
    """Rich-markup lines. `report_dir`: where this aggregator writes reports, when it is known here (a local
    federation); `wall`: seconds to show instead of the job's own duration."""
    state, job_id = summary["state"], summary["job_id"]
    seconds = wall if wall is not None else max(0.0, summary["updated_at"] - summary["created_at"])
    colour = "green" if state == "finished" else "red"
    reason = f": {escape(summary['reason'])}" if summary.get("reason") else ""
    lines = [f"job {job_id} [{colour}]{state}[/] in {seconds:.1f}s{reason}"]
    no_noise = summary["spec"]["privacy"]["noise_multiplier"] == 0
    for site, s in summary["sites"].items():
        # Every ε with its unit: the job's first, then any other unit the site's policy also applied.
        by_unit = s.get("epsilon_by_unit") or ({s.get("epsilon_unit", "site"): s["epsilon"]} if s["epsilon"] else {})
        eps = " · ".join(f"ε={e:.3f} {UNIT_WORDS.get(u, u)}" for u, e in by_unit.items() if e is not None)
        if not eps:  # nothing released: refused, or no round reached this site
            eps = "no DP" if no_noise and s["decision"] == "accepted" else ""
        why = f"({escape('; '.join(s['reasons']))})" if s["reasons"] else ""
        lines.append(f"  {site:<15} {s['decision']:<9} {' '.join(x for x in (eps, why) if x)}".rstrip())
    privacy = summary.get("privacy")
    if privacy:
        lines.append(f"  (ε at δ={privacy['delta']:g}, unit: {privacy['unit']} = {privacy['unit_words']})")
    final = summary["history"][-1]["global"] if summary["history"] else None
    if state == "finished" and final is not None:
        auc = "—" if final["auc"] is None else f"{final['auc']:.4f}"
        loss = "—" if final["loss"] is None else f"{final['loss']:.4f}"
        lines.append(f"final global model: validation AUC {auc}, loss {loss} (sample-weighted mean of the sites' "
                     "own validation splits)")
    if state == "finished":
        out = report_dir / job_id if report_dir is not None else None
        present = [out / name for name in REPORT_FILES if (out / name).exists()] if out is not None else []
        if present:
            lines.append("report:")
            lines += [f"  {escape(str(p))}" for p in present]
        else:
            where = f"{out}" if out is not None else f"<report_dir>/{job_id}"
            lines.append(f"report: written by the aggregator to {escape(where)}/ (`fedsilo report {job_id} --config "
                         "aggregator.yaml` rebuilds it there)")
            if aggregator is not None:
                lines.append(f"final model: GET {aggregator}/api/v1/jobs/{job_id}/model")
    return lines


def print_outcome(summary: dict[str, Any], report_dir: Path | None, wall: float | None = None,
                  aggregator: str | None = None) -> None:
    out = console()
    for line in outcome_lines(summary, report_dir, wall, aggregator):
        out.print(line)


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished job, 1 for a failed or cancelled one, 2 for one still running (the watch gave up)."""
    if summary["state"] == "finished":
        return 0
    return 1 if summary["state"] in ("failed", "cancelled") else 2


def ago(at: float | None) -> str:
    """How long ago a timestamp was, in the unit that reads best."""
    if not at:
        return "never"
    s = max(0.0, time.time() - at)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"
