"""`fedsilo demo`: the heart-disease federation on this machine, from data split to report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from fedsilo.progress import watch

console = Console()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_demo(workdir: Path, job_file: Path, timeout: float = 1800) -> dict[str, Any]:
    """Split the data per center, start broker, aggregator and four agents, run the job, print the report."""
    if (workdir / "state").exists():
        shutil.rmtree(workdir / "state")  # every demo starts from a clean federation
    files = split_by_center(workdir / "data")
    console.print(f"[bold]fedsilo demo[/]: {len(files)} hospitals, one data file each under {workdir / 'data'}")
    policies = {site: example_policy(site, {"heart-disease": path}) for site, path in files.items()}
    fed = LocalFederation(workdir, policies)
    t0 = time.monotonic()
    try:
        fed.start()
        console.print(f"broker mqtts://127.0.0.1:{fed.broker.port} (mosquitto, mTLS, per-site ACL) · aggregator "
                      f"{fed.url} (mTLS) · agents online under policies/examples: {', '.join(files)} "
                      f"({time.monotonic() - t0:.1f}s)")
        console.print(f"PKI (CA, site/aggregator/broker/operator certificates, job-signing key) in {fed.pki.root}")
        console.print(f"structured logs (JSON) in {workdir / 'logs'}")
        job_id = fed.client.submit(job_file.read_text())
        console.print(f"submitted {job_file} → job [bold]{job_id}[/]")
        summary = watch(fed.client, job_id, timeout=timeout)
    finally:
        fed.stop()
    _print_outcome(summary, fed.report_dir / summary["job_id"], time.monotonic() - t0)
    return summary


def _print_outcome(summary: dict[str, Any], report: Path, wall: float) -> None:
    state = summary["state"]
    colour = "green" if state == "finished" else "red"
    console.print(f"job {summary['job_id']} [{colour}]{state}[/] in {wall:.1f}s {summary['reason']}")
    words = {"record": "per patient record", "site": "per site"}
    for site, s in summary["sites"].items():
        # Every ε with its unit: the job's first, then any other unit the site's policy also applied.
        by_unit = s.get("epsilon_by_unit") or ({s.get("epsilon_unit", "site"): s["epsilon"]} if s["epsilon"] else {})
        eps = " · ".join(f"ε={e:.3f} {words.get(u, u)}" for u, e in by_unit.items() if e is not None) or "no DP"
        reasons = f" ({'; '.join(s['reasons'])})" if s["reasons"] else ""
        console.print(f"  {site:<15} {s['decision']:<9} {eps}{reasons}")
    privacy = summary.get("privacy", {})
    if privacy:
        console.print(f"  (ε at δ={privacy['delta']:g}, unit: {privacy['unit']} = {privacy['unit_words']})")
    if state == "finished":
        final = summary["history"][-1]["global"]
        console.print(f"final global model: validation AUC {final['auc']:.4f}, loss {final['loss']:.4f}")
        for name in ("report.html", "metrics.json", "metrics.csv", "metrics.png", "model.safetensors"):
            if (report / name).exists():  # report.html comes from the local tracking sink, if it is on
                console.print(f"  {report / name}")
