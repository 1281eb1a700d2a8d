"""Rendering the charts with helm and reading the manifests back, for the chart tests and the policy scan."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._tools import CHARTS, REPO, tool

KUBERNETES_VERSION = "1.35.0"  # the kubectl the tools install; EKS's current line
NAMESPACE = "fedsilo"


def values_files(chart: str) -> list[Path]:
    return sorted((CHARTS / chart / "ci").glob("*.yaml"))


def cases() -> list[tuple[str, Path]]:
    return [(chart, values) for chart in ("agent", "aggregator") for values in values_files(chart)]


@functools.cache  # several tests read the same rendering; its text is immutable
def template(chart: str, *values: Path, sets: tuple[str, ...] = (), expect_error: bool = False,
             skip_schema: bool = False) -> str:
    """`helm template` output (or, with expect_error, helm's error message). `skip_schema` leaves
    values.schema.json out, to reach the templates' own checks behind it."""
    args = [str(tool("helm")), "template", "fedsilo", str(CHARTS / chart), "--namespace", NAMESPACE,
            "--kube-version", KUBERNETES_VERSION]
    if skip_schema:
        args.append("--skip-schema-validation")
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    if expect_error:
        assert proc.returncode != 0, f"helm template should have failed for {values} {sets}"
        return proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"helm template {chart} {[str(v) for v in values]} failed:\n{proc.stderr}", pytrace=False)
    return proc.stdout


def manifests(chart: str, *values: Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(chart, *values, sets=sets)) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]
