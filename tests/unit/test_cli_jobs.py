"""The operator CLI's endings: one summary for demo, `job submit --wait` and `job watch`, exit codes, whole paths in
a pipe, and one line (no traceback) when the aggregator cannot be reached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fedsilo.cli import main
from fedsilo.netutil import free_port
from fedsilo.summary import exit_code, outcome_lines, print_outcome


def summary(state: str = "finished", **extra: Any) -> dict[str, Any]:
    return {
        "job_id": "outcome-logreg-1234abcd", "state": state, "reason": extra.get("reason", ""),
        "created_at": 100.0, "updated_at": 112.5, "spec": {"privacy": {"noise_multiplier": 0.4}},
        "sites": extra.get("sites", {
            "north": {"decision": "accepted", "reasons": [], "epsilon": 67.4231},
            "south": {"decision": "refused", "reasons": ["purpose 'x' is not allowed", "column(s) not allowed"],
                      "epsilon": None}}),
        "history": [{"global": {"auc": 0.73125, "loss": 0.62, "n": 200}}],
    }


def test_outcome_names_state_sites_epsilon_metrics_and_report(tmp_path: Path) -> None:
    report = tmp_path / ("a-rather-long-directory-name-" * 4) / "reports"
    (report / "outcome-logreg-1234abcd").mkdir(parents=True)
    (report / "outcome-logreg-1234abcd" / "report.html").write_text("<html/>")
    lines = outcome_lines(summary(), report)
    assert lines[0] == "job outcome-logreg-1234abcd [green]finished[/] in 12.5s"
    assert lines[1] == "  north           accepted  ε=67.423 per site"
    assert lines[2] == "  south           refused   (purpose 'x' is not allowed; column(s) not allowed)"
    assert lines[3].startswith("final global model: validation AUC 0.7312, loss 0.6200")
    assert lines[4:] == ["report:", f"  {report / 'outcome-logreg-1234abcd' / 'report.html'}"]


def test_a_failed_job_gives_its_reason_and_no_report(tmp_path: Path) -> None:
    lines = outcome_lines(summary("failed", reason="only 1 of 2 sites accepted (min_sites 2)"), None,
                          aggregator="https://agg:8443")
    assert lines[0] == "job outcome-logreg-1234abcd [red]failed[/] in 12.5s: only 1 of 2 sites accepted (min_sites 2)"
    assert not any(line.startswith(("final", "report")) for line in lines)
    assert [exit_code(summary(s)) for s in ("finished", "failed", "cancelled", "running")] == [0, 1, 1, 2]


def test_remote_report_is_named_where_the_aggregator_keeps_it() -> None:
    lines = outcome_lines(summary(), None, aggregator="https://agg:8443")
    assert lines[-2].startswith("report: written by the aggregator to <report_dir>/outcome-logreg-1234abcd/")
    assert lines[-1] == "final model: GET https://agg:8443/api/v1/jobs/outcome-logreg-1234abcd/model"


def test_paths_are_not_wrapped_in_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    report = tmp_path / ("deep-" * 30)
    (report / "outcome-logreg-1234abcd").mkdir(parents=True)
    (report / "outcome-logreg-1234abcd" / "metrics.json").write_text("{}")
    print_outcome(summary(), report)
    out = capsys.readouterr().out
    assert f"  {report / 'outcome-logreg-1234abcd' / 'metrics.json'}\n" in out
    assert "[green]" not in out and "finished in 12.5s" in out


@pytest.mark.parametrize("args", [["job", "list"], ["job", "status", "x"], ["sites"], ["job", "watch", "x"]])
def test_an_unreachable_aggregator_is_one_line(args: list[str]) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, [*args, "--aggregator", url])
    assert result.exit_code == 1
    assert result.output == f"Error: cannot reach the aggregator at {url}: connection refused (is the aggregator " \
                            "running, on this host and port?)\n"


def test_the_aggregator_url_comes_from_the_environment() -> None:
    url = f"https://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["job", "list"], env={"FEDSILO_AGGREGATOR": url})
    assert result.exit_code == 1 and f"at {url}:" in result.output


def test_every_new_command_is_there() -> None:
    for args in (["local", "init"], ["local", "up"], ["local", "status"], ["local", "down"], ["job", "init"],
                 ["sites"], ["model", "evaluate"], ["broker", "config"], ["agent", "example-config"],
                 ["aggregator", "example-config"], ["data", "synthetic"]):
        result = CliRunner().invoke(main, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, args
