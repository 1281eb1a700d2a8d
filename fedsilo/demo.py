"""`fedsilo demo`: the heart-disease case of a local federation, from data split to report.

The same path as `fedsilo local init|up`, `job submit --wait` and `local down`: the workspace is written by
`write_workspace`, the processes started and stopped by `LocalFederation`, the job followed by `watch` and its
outcome printed by `print_outcome`. Only the inputs differ: the UCI data split per center, and each center's
example policy from `policies/examples/`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from fedsilo.datasets import SITE_CENTERS, split_by_center
from fedsilo.local import LocalFederation, example_policy
from fedsilo.localinit import load_job
from fedsilo.progress import watch
from fedsilo.summary import console, print_outcome
from fedsilo.workspace import LocalError, Manifest, Workspace, allocate_ports, clear_state, write_workspace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_demo(workdir: Path, job_file: Path, timeout: float = 1800, secure: bool = False) -> dict[str, Any]:
    """Split the data per center, start broker, aggregator and four agents, run the job, print the report. With
    `secure`, the job runs with secure aggregation (`secure_aggregation: true` added to the job file's)."""
    spec = load_job(job_file)
    text = job_file.read_text()
    if secure:
        job = yaml.safe_load(text)
        job["secure_aggregation"] = job.get("secure_aggregation") or True
        text = yaml.safe_dump(job, sort_keys=False)
    sites = list(SITE_CENTERS)
    unknown = [s for s in spec.sites if s not in sites]
    if unknown:  # such a job could only wait out its accept deadline and fail
        raise LocalError(f"{job_file} lists site(s) {', '.join(unknown)} that the demo federation does not have; "
                         f"job sites: {', '.join(spec.sites)}; demo sites: {', '.join(sites)} (for your own "
                         "sites and data, see `fedsilo local init --help`)")
    ws = Workspace(workdir)
    if ws.exists() and ws.load().sites != sites:  # never rewrite another federation's reviewed policies
        raise LocalError(f"{ws.root} holds another local federation (sites {', '.join(ws.load().sites)}); give the "
                         "demo a --workdir of its own")
    running = ws.processes.running()
    if running:
        raise LocalError(f"a federation is running in {ws.root} ({', '.join(r.name for r in running)}): "
                         "`fedsilo local down --workspace " + str(workdir) + "` first")
    out = console()
    clear_state(ws)  # every demo starts from a clean federation
    files = split_by_center(ws.root / "data")
    out.print(f"[bold]fedsilo demo[/]: {len(files)} hospitals, one data file each under {ws.root / 'data'}")
    policies = {site: example_policy(site, {"heart-disease": path}) for site, path in files.items()}
    manifest = Manifest(sites=sites, ports=allocate_ports(sites), data=files, job_file=job_file.resolve())
    write_workspace(ws, manifest, policies)
    fed = LocalFederation.open(ws.root)
    t0 = time.monotonic()
    try:
        fed.start()
        out.print(f"broker mqtts://127.0.0.1:{fed.broker.port} (mosquitto, mTLS, per-site ACL) · aggregator "
                  f"{fed.url} (mTLS) · agents online under policies/examples: {', '.join(files)} "
                  f"({time.monotonic() - t0:.1f}s)")
        out.print(f"PKI (CA, site/aggregator/broker/operator certificates, job-signing key) in {fed.pki.root}")
        out.print(f"structured logs (JSON) in {ws.logs_dir}")
        job_id = fed.client.submit(text)
        out.print(f"submitted {job_file}{' with secure aggregation' if secure else ''} → job [bold]{job_id}[/]")
        summary = watch(fed.client, job_id, timeout=timeout)
    finally:
        fed.stop()
    print_outcome(summary, fed.report_dir, time.monotonic() - t0)
    return summary
