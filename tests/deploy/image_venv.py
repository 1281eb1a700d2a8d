"""The virtualenv the image-command check runs in: the project installed the way the Dockerfiles install it.

Its dependencies (CPU torch first and alone, then the project's wheel with the `aws` extra) are installed once per
set of runtime requirements, under .tools/ keyed by their hash; `make install-test` builds it
(`python -m tests.deploy.image_venv`), so the suite only reinstalls the freshly built wheel. The test builds it
too when it is missing, so a checkout without the install step still runs the check.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from tests.deploy._tools import REPO

TOOLS = REPO / ".tools"


class InstallError(RuntimeError):
    pass


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise InstallError(f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def _runtime_requirements() -> str:
    """What the images install besides the project itself: its dependencies and the `aws` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return json.dumps([project["dependencies"], project["optional-dependencies"].get("aws", []),
                       project["requires-python"]])


def build_wheel(out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise InstallError(f"building the wheel failed:\n{proc.stderr[-3000:]}")
    (wheel,) = out.glob("fedsilo-*.whl")
    return wheel


def ensure(wheel: Path) -> Path:
    """bin/ of the image virtualenv with `wheel` installed; dependencies only when the requirements changed."""
    key = hashlib.sha256(_runtime_requirements().encode()).hexdigest()[:16]
    TOOLS.mkdir(exist_ok=True)
    venv = TOOLS / f"image-venv-{key}"
    python = venv / "bin" / "python"
    with (TOOLS / "image-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several test runs may share the checkout
        if not (venv / ".complete").exists():
            for old in TOOLS.glob("image-venv-*"):
                shutil.rmtree(old, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            _pip(python, "torch==2.13.0")  # first and alone, as in the Dockerfiles: the CPU build
            _pip(python, f"{wheel}[aws]")
            (venv / ".complete").touch()
        _pip(python, "--force-reinstall", "--no-deps", str(wheel))
    return venv / "bin"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="fedsilo-wheel-") as tmp:
        print(ensure(build_wheel(Path(tmp))))
