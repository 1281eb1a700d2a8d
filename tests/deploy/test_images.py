"""The two Dockerfiles: hadolint clean, and the properties issue 7 asks of them, read from the files.
(No Docker engine here: the images are linted and their commands tested in test_entrypoints.py, not built.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy._tools import REPO, dockerfile_instructions, exec_form, run, tool

DOCKERFILES = {"agent": REPO / "Dockerfile.agent", "aggregator": REPO / "Dockerfile.aggregator"}
OCI_LABELS = ("title", "description", "version", "revision", "licenses", "source", "documentation")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    run(tool("hadolint"), "--failure-threshold", "info", DOCKERFILES[name])


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_is_multi_stage_slim_non_root_with_healthcheck(name: str) -> None:
    path = DOCKERFILES[name]
    steps = dockerfile_instructions(path)
    text = path.read_text()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    assert all(f.startswith("python:3.11-slim AS ") for f in froms), froms
    runtime = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the runtime stage must end as a non-root user"
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text, "CPU-only torch"
    assert any(word == "COPY" and rest.startswith("--from=build") for word, rest in runtime)
    labels = " ".join(rest for word, rest in runtime if word == "LABEL")
    for label in OCI_LABELS:
        assert f"org.opencontainers.image.{label}=" in labels
    assert exec_form(path, "HEALTHCHECK")[0] == "python"
    assert exec_form(path, "ENTRYPOINT") == ["fedsilo"]
    assert exec_form(path, "CMD")[:2] == [name, "run" if name == "agent" else "serve"]
    volumes = " ".join(rest for word, rest in runtime if word == "VOLUME")
    assert f"/var/fedsilo/{name}" in volumes and "/tmp" in volumes, "state and scratch on volumes (read-only root)"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secret_is_baked_in(name: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[name])
    for word, rest in steps:
        if word in ("ENV", "ARG"):
            names = [token.split("=", 1)[0] for token in rest.split() if "=" in token]
            assert not [n for n in names if re.search(r"(?i)password|secret|token|access_key|private", n)], rest
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.(key|pem|crt)\b|pki", rest), rest


def test_dockerignore_lets_in_only_what_the_images_build_from() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "deny everything first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied: set[str] = set()
    for path in DOCKERFILES.values():
        for word, rest in dockerfile_instructions(path):
            if word == "COPY" and not rest.startswith("--from"):
                copied.update(p.rstrip("/").removeprefix("./") for p in rest.split()[:-1])
    assert copied <= allowed, f"COPY sources the build context would not contain: {copied - allowed}"
    for pattern in ("**/*.key", "**/*.pem", "**/*.crt", "**/.env"):
        assert pattern in lines
    assert Path(REPO / "deploy" / "config" / "aggregator.yaml").is_file()
