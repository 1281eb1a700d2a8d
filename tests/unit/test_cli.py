"""Every command of the `fedsilo` CLI answers --help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from fedsilo.cli import main


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", commands(main), ids=lambda p: " ".join(p) or "fedsilo")
def test_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_expected_commands_exist() -> None:
    names = {" ".join(p) for p in commands(main)}
    assert {"demo", "aggregator serve", "agent run", "job submit", "job status", "data split"} <= names


def test_submit_reports_invalid_fields(tmp_path: object) -> None:
    from pathlib import Path

    job = Path(str(tmp_path)) / "job.yaml"
    job.write_text("name: x\n")
    result = CliRunner().invoke(main, ["job", "submit", str(job), "--aggregator", "http://127.0.0.1:9"])
    assert result.exit_code != 0
