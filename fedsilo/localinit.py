"""`fedsilo local init`: a local federation from the user's own CSVs (one per site) and a job file.

Everything is checked before anything is written (site names, files, the columns each file must have, the job,
ports, an existing workspace), so a refused `init` leaves nothing behind. Each site gets a policy that allows only
its own file, only the job's columns and target and only the job's purpose, with the privacy, egress, model and
operations limits of the example policies (`policies/examples/`): a starting point the sites review, not a
blanket yes.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from federation.jobs import JobSpec
from federation.schema import field_errors
from fedsilo.certs import CertError, check_site_name
from fedsilo.workspace import LocalError, Manifest, Workspace, allocate_ports, write_workspace

# The limits every example policy shares (the most common value where they differ; `tests/unit/test_local_init.py`
# keeps the two in step).
MIN_COHORT = 100
POLICY_LIMITS: dict[str, Any] = {
    "privacy": {"allowed_units": ["site", "record"], "required_units": [], "max_clip_norm": 1.0,
                "min_noise_multiplier": 0.3, "min_record_noise_multiplier": 0.5, "max_record_clip_norm": 5.0,
                "max_epsilon_per_job": {"site": 100, "record": 2}},
    "budget": {"epsilon": {"site": 300, "record": 4}, "delta": 1.0e-5, "reset_period_days": 365},
    "egress": {"max_upload_bytes_per_round": 1048576, "allowed_metrics": ["auc", "loss", "n"],
               "min_records_per_metric": 20, "share_tracking": True},
    "models": {"allowed": ["logreg", "mlp"], "max_parameters": 100000},
    "operations": {"max_concurrent_jobs": 1},
}
# What `init` writes; any of it already there means a workspace that only `--force` may overwrite.
_WRITES = ("federation.yaml", "operator.env", "config", "broker")


def load_job(job_file: Path) -> JobSpec:
    try:
        return JobSpec.from_yaml(job_file.read_text())
    except ValidationError as exc:
        bad = "; ".join(f"{f or 'job'}: {m}" for f, m in field_errors(exc))
        raise LocalError(f"{job_file} is not a valid job: {bad}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LocalError(f"cannot read job file {job_file}: {exc}") from None


def parse_sites(pairs: Sequence[str], folder: Path | None) -> dict[str, Path]:
    """`site=path.csv` entries, or a folder of CSVs named after their sites; each site on a file of its own."""
    if bool(pairs) == (folder is not None):
        raise LocalError("give the sites' data either as SITE=FILE.csv (one per site) or as a folder of CSVs "
                         "(one per site, named SITE.csv), not both")
    files: dict[str, Path] = {}
    if folder is not None:
        if not folder.is_dir():
            raise LocalError(f"{folder} is not a folder")
        found = sorted(folder.glob("*.csv"))
        if not found:
            raise LocalError(f"{folder} holds no .csv file (one per site, named SITE.csv)")
        entries = [(p.stem, p) for p in found]
    else:
        entries = []
        for pair in pairs:
            name, sep, given = pair.partition("=")
            if not sep or not name or not given:
                raise LocalError(f"{pair!r}: expected SITE=FILE.csv")
            entries.append((name, Path(given)))
    for site, path in entries:
        try:
            check_site_name(site)
        except CertError as exc:
            raise LocalError(str(exc)) from None
        if site in files:
            raise LocalError(f"site {site!r} is given twice")
        if not path.is_file():
            raise LocalError(f"site {site}: data file {path} does not exist")
        for other, seen in files.items():
            if path.resolve() == seen.resolve() or path.samefile(seen):
                raise LocalError(f"sites {other} and {site} both point to {path}: each site holds its own file")
        files[site] = path.resolve()
    return files


def header(path: Path) -> list[str]:
    """The CSV's column names: its first line, and nothing more of it."""
    try:
        with path.open(newline="") as f:
            row = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LocalError(f"cannot read the header of {path}: {exc}") from None
    if not row:
        raise LocalError(f"{path} is empty (no header line)")
    return [c.strip() for c in row]


def check_columns(files: dict[str, Path], spec: JobSpec) -> None:
    target = spec.features.target.column
    for site, path in files.items():
        columns = header(path)
        if target not in columns:
            raise LocalError(f"site {site}: {path} has no column {target!r} (the job's target); its columns are: "
                             f"{', '.join(columns)}")
        missing = [c for c in spec.features.columns() if c not in columns]
        if missing:
            raise LocalError(f"site {site}: {path} lacks the job's feature column(s) {', '.join(missing)}")


def site_policy(site: str, path: Path, spec: JobSpec) -> dict[str, Any]:
    """Only this site's file, only the job's columns, target and purpose; the examples' limits for the rest."""
    limits = POLICY_LIMITS
    dataset = spec.dataset.name
    return {
        "site": site,
        "datasets": {dataset: {
            "path": str(path), "format": "csv", "allowed_columns": spec.features.columns(),
            "target": spec.features.target.column, "min_cohort": MIN_COHORT, "allowed_purposes": [spec.purpose],
        }},
        "privacy": {**limits["privacy"], "budgets": {dataset: dict(limits["budget"])}},
        "egress": {"allowed_endpoints": [], **limits["egress"]},
        "models": dict(limits["models"]),
        "operations": dict(limits["operations"]),
    }


def _policy_header(site: str, spec: JobSpec) -> str:
    return (f"# Site policy of {site}, written by `fedsilo local init`: only {site}'s own file, only the columns,\n"
            f"# target and purpose of job {spec.name!r}; privacy, egress, model and operations limits as in the\n"
            "# example policies (policies/examples/). Review it (`fedsilo policy check THIS_FILE` reads it back in\n"
            "# plain words) and edit what this site would not allow; `fedsilo local up` uses it as it is.\n")


@dataclass(frozen=True)
class Initialized:
    workspace: Workspace
    manifest: Manifest
    spec: JobSpec


def init_local(root: Path, files: dict[str, Path], job_file: Path, *, force: bool = False,
               broker_port: int | None = None, aggregator_port: int | None = None) -> Initialized:
    """Check everything, then write the workspace. Raises LocalError, having written nothing, when anything is off."""
    spec = load_job(job_file)
    unknown = [s for s in spec.sites if s not in files]
    if unknown:
        raise LocalError(f"the job lists site(s) {', '.join(unknown)} that this federation does not have; job "
                         f"sites: {', '.join(spec.sites)}; federation sites: {', '.join(files)}")
    check_columns(files, spec)
    ws = Workspace(root)
    if not force:
        existing = [name for name in _WRITES if (ws.root / name).exists()]
        if existing:
            raise LocalError(f"{ws.root} already holds a local federation ({', '.join(existing)}); pass --force to "
                             "rewrite its policies and configs (its PKI, state and reports are kept)")
    running = ws.processes.running()
    if running:
        raise LocalError(f"the federation in {ws.root} is running ({', '.join(r.name for r in running)}): "
                         "`fedsilo local down` first")
    manifest = Manifest(sites=list(files), ports=allocate_ports(files, broker_port, aggregator_port),
                        data=files, job_file=job_file.resolve())
    policies = {site: site_policy(site, path, spec) for site, path in files.items()}
    fresh = not ws.root.exists()
    try:
        write_workspace(ws, manifest, policies, policy_headers={s: _policy_header(s, spec) for s in files})
    except BaseException:
        if fresh:  # a new workspace that could not be completed is removed, not left half-written
            shutil.rmtree(ws.root, ignore_errors=True)
        raise
    return Initialized(ws, manifest, spec)


def review(init: Initialized) -> list[str]:
    """Each site's policy in plain words and what it would answer to the job, for the person running `init`."""
    from agent.daemon import load_data
    from agent.policy import SitePolicy, describe, evaluate

    lines: list[str] = []
    for site in init.manifest.sites:
        path = init.workspace.policy_file(site)
        policy = SitePolicy.load(path)
        lines.append(f"policy of {site} ({path}):")
        lines += [f"  {line}" for line in describe(policy)]
        if site in init.spec.sites:
            decision, _ = evaluate(policy, init.spec, site, endpoints=[], spent={}, active_jobs=0, load=load_data)
            eps = "no DP" if decision.epsilon_planned is None else f"projected ε {decision.epsilon_planned:.2f}"
            if decision.accepted:
                lines.append(f"  → would ACCEPT job {init.spec.name!r} ({eps})")
            else:
                lines.append(f"  → would REFUSE job {init.spec.name!r} ({eps}): " + "; ".join(decision.reasons))
    return lines
