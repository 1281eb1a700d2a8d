"""Where the deployment checks find the repository, the tools `scripts/install-deploy-tools.sh` installs, and
the instructions of a Dockerfile. A missing tool fails the test with the command that installs it: the checks
are part of the suite, so a machine without the tools must not pass them silently."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHARTS = DEPLOY / "helm"
TERRAFORM = DEPLOY / "terraform"
GRAFANA = DEPLOY / "grafana"
INSTALL_HINT = "run `bash scripts/install-deploy-tools.sh` (or `make install-test`)"


def tool(name: str) -> Path:
    """A deployment tool: helm/kubectl in .tools/bin, checkov in .venv-checkov, the rest in .venv."""
    for candidate in (REPO / ".tools" / "bin" / name, REPO / ".venv-checkov" / "bin" / name,
                      REPO / ".venv" / "bin" / name):
        if candidate.is_file():
            return candidate
    pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)


def optional_tool(name: str) -> Path | None:
    """A tool that only some machines have (terraform): None when it is not on PATH."""
    found = shutil.which(name)
    return Path(found) if found else None


def run(*args: str | Path, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool; a non-zero exit fails the test with the tool's own output."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(str(a) for a in args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(path: Path, instruction: str) -> list[str]:
    """The JSON (exec) form of the last ENTRYPOINT, CMD or HEALTHCHECK CMD of a Dockerfile."""
    args = [rest for word, rest in dockerfile_instructions(path) if word == instruction][-1]
    if instruction == "HEALTHCHECK":
        args = args[args.index("CMD ") + len("CMD "):]
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{instruction} is not exec form"
    return value
