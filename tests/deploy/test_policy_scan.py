"""checkov (offline, --skip-download) on the rendered charts, the Dockerfiles and the Terraform: no failed check
at all, and every skipped check carries its reason in the file (`#checkov:skip=ID:reason` in Terraform,
`checkov.io/skip<N>: ID=reason` annotations in manifests)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy._helm import cases, template
from tests.deploy._tools import REPO, TERRAFORM, tool

SKIP_COMMENT = re.compile(r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?")


def checkov(*args: str | Path) -> list[dict[str, Any]]:
    """checkov's JSON report, one entry per framework it ran."""
    proc = subprocess.run([str(tool("checkov")), "--skip-download", "--quiet", "--compact", "-o", "json",
                           *[str(a) for a in args]], capture_output=True, text=True, timeout=300, cwd=REPO)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        pytest.fail(f"checkov did not run ({proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    return [r for r in reports if isinstance(r, dict) and "results" in r]


def failures(reports: list[dict[str, Any]]) -> list[str]:
    return [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range']})"
            for r in reports for c in r["results"]["failed_checks"]]


def ran(reports: list[dict[str, Any]]) -> int:
    return sum(r["summary"]["passed"] + r["summary"]["failed"] for r in reports)


def test_rendered_charts_pass_checkov(tmp_path: Path) -> None:
    for chart, values in cases():
        (tmp_path / f"{chart}-{values.stem}.yaml").write_text(template(chart, values))
    reports = checkov("--framework", "kubernetes", "-d", tmp_path)
    assert ran(reports) > 100, "checkov found no Kubernetes resources to check"
    assert not failures(reports), "\n".join(failures(reports))


def test_dockerfiles_pass_checkov() -> None:
    reports = checkov("--framework", "dockerfile",
                      "-f", REPO / "Dockerfile.agent", "-f", REPO / "Dockerfile.aggregator")
    assert ran(reports) > 10
    assert not failures(reports), "\n".join(failures(reports))


def test_terraform_passes_checkov() -> None:
    reports = checkov("--framework", "terraform", "-d", TERRAFORM)
    assert ran(reports) > 20
    assert not failures(reports), "\n".join(failures(reports))


def test_every_skipped_check_says_why() -> None:
    files = [*TERRAFORM.rglob("*.tf"), *(REPO / "deploy" / "helm").rglob("*.yaml"), REPO / "Dockerfile.agent",
             REPO / "Dockerfile.aggregator"]
    skips = 0
    for path in files:
        for line in path.read_text().splitlines():
            match = SKIP_COMMENT.search(line)
            if match:
                skips += 1
                reason = (match.group(2) or "").strip()
                assert len(reason.split()) >= 5, f"{path.name}: skip of {match.group(1)} without a reason: {line}"
            annotation = re.search(r"checkov\.io/skip\d+:\s*([A-Z0-9_]+)(?:=(.*))?", line)
            if annotation:
                skips += 1
                assert len((annotation.group(2) or "").split()) >= 5, f"{path.name}: unexplained skip: {line}"
    assert skips > 0
