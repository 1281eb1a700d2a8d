"""Your own federation in one command: three clinics' CSVs the repository generates (another schema than heart
disease: categoricals, a three-valued text target of which one value is positive), driven only through the
`fedsilo` commands a new user runs, as separate processes: `data synthetic`, `job init`, `local init|up|status|
down`, `job submit --wait`, `sites`, `model evaluate`. Then the services' SIGTERM: fast, exit code 0, nothing lost.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from federation.jobs import JobSpec
from federation.privacy import epsilon_for
from fedsilo.local import LocalFederation
from fedsilo.netutil import free_port
from fedsilo.processes import ProcessTable
from tests.waiting import wait_round

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
FEDSILO = Path(sys.executable).with_name("fedsilo")
SITES = ("east", "north", "south")
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def fedsilo(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FEDSILO), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "80", **(env or {})}, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure is exit code 1 and a single `Error: ...` line on stderr, never a traceback."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def operator_env(root: Path) -> dict[str, str]:
    env = {}
    for line in (root / "fed" / "operator.env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    return env


@pytest.fixture(scope="module")
def adopter() -> Iterator[None]:
    """Make this process a child subreaper (Linux): the services `fedsilo local up` leaves running in the background
    are adopted by it when that command exits, so the tests can read their exit codes."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, adopter: None) -> Iterator[Path]:
    """A new user's directory: three CSVs, a proposed job, a workspace `fed`, and the federation up."""
    root = tmp_path_factory.mktemp("own-data")
    ok(fedsilo("data", "synthetic", "--out", "data", "--rows", "200", cwd=root))
    ok(fedsilo("job", "init", "--csv", "data/north.csv", "--target", "outcome", "--positive", "relapse",
               "--sites", ",".join(SITES), "--rounds", "4", "-o", "job.yaml", cwd=root))
    out = ok(fedsilo("local", "init", "-w", "fed", "--data", "data", "--job", "job.yaml", cwd=root))
    assert out.count("→ would ACCEPT job 'outcome-logreg'") == 3, out
    out = ok(fedsilo("local", "up", "-w", "fed", cwd=root))
    assert all(re.search(rf"agent\s+{s}\s+online", out) for s in SITES), out
    yield root
    fedsilo("local", "down", "-w", "fed", cwd=root)  # whatever a failed test left running


def test_job_init_proposes_the_schema_from_the_header_and_types(home: Path) -> None:
    spec = JobSpec.from_yaml((home / "job.yaml").read_text())
    assert spec.features.numeric == ["age", "bmi", "length_of_stay", "prior_admissions"]
    assert {c.name: c.vocabulary for c in spec.features.categorical} == {
        "ward": ["cardio", "general", "onco", "ortho"], "smoker": ["current", "former", "never"],
        "admission": ["elective", "emergency"]}
    assert (spec.features.target.column, spec.features.target.positive_values) == ("outcome", ["relapse"])
    assert "patient_id" not in spec.features.columns()  # an identifier is never proposed as a feature
    assert sorted(spec.sites) == sorted(SITES) and spec.rounds == 4


def test_a_job_runs_to_the_end_through_the_commands(home: Path) -> None:
    env = operator_env(home)
    result = fedsilo("job", "submit", "job.yaml", "--wait", cwd=home, env=env)
    out = ok(result)
    job_id = out.splitlines()[0]
    assert re.search(rf"^job {re.escape(job_id)} finished in [0-9.]+s$", out, re.M), out
    for site in SITES:
            assert re.search(rf"^  {site}\s+accepted\s+ε=\d+\.\d{{3}} per (site|patient record)$", out, re.M), out
    final = re.search(r"^final global model: validation AUC (\d\.\d+), loss (\d\.\d+)", out, re.M)
    assert final is not None, out
    report = Path(env["FEDSILO_REPORT_DIR"]) / job_id
    for name in ("report.html", "metrics.json", "model.safetensors"):
        # each path is printed whole on its own line, though far wider than the 80 columns of COLUMNS
        assert f"  {report / name}\n" in out and (report / name).is_file()
    summary = json.loads((report / "metrics.json").read_text())  # what `fedsilo job status` serves
    assert summary["state"] == "finished" and len(summary["history"]) == 5
    assert float(final.group(1)) == pytest.approx(summary["history"][-1]["global"]["auc"], abs=1e-4)

    sites = ok(fedsilo("sites", cwd=home, env=env))
    for site in SITES:
        row = rf"^{site}\s+online\s+\d+s ago\s+1 accepted, 0 refused, 0 active\s+\d+\.\d\d$"
        assert re.search(row, sites, re.M), sites

    # A site scores the global model on its own file exactly as its agent did in the final evaluation round.
    scored = ok(fedsilo("model", "evaluate", str(report / "model.safetensors"), "--job", "job.yaml",
                        "--data", "data/north.csv", cwd=home))
    reported = summary["history"][-1]["sites"]["north"]
    auc = re.search(r"^AUC (\d\.\d+)\s+loss (\d\.\d+)", scored, re.M)
    assert auc is not None, scored
    assert float(auc.group(1)) == pytest.approx(reported["auc"], abs=1e-4)
    assert float(auc.group(2)) == pytest.approx(reported["loss"], abs=1e-4)
    assert re.search(rf"^{reported['n']} rows", scored, re.M) and "calibration" in scored


def test_a_job_the_sites_refuse_fails_with_their_reasons(home: Path) -> None:
    job = yaml.safe_load((home / "job.yaml").read_text())
    job.update(name="outcome-marketing", purpose="marketing")
    (home / "marketing.yaml").write_text(yaml.safe_dump(job))
    result = fedsilo("job", "submit", "marketing.yaml", "--wait", cwd=home, env=operator_env(home))
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^job outcome-marketing-\w+ failed in [0-9.]+s: only 0 of 3 sites accepted", result.stdout,
                     re.M), result.stdout
    for site in SITES:
        refusal = rf"^  {site}\s+refused\s+\(purpose 'marketing' is not allowed for 'outcome'"
        assert re.search(refusal, result.stdout, re.M), result.stdout


def test_operator_errors_are_one_line_naming_the_url_and_the_cause(home: Path) -> None:
    env = operator_env(home)
    nobody = f"https://127.0.0.1:{free_port()}"
    line = one_line_error(fedsilo("job", "list", "--aggregator", nobody, cwd=home, env=env))
    assert f"cannot reach the aggregator at {nobody}: connection refused" in line
    plain = env["FEDSILO_AGGREGATOR"].replace("https://", "http://")
    line = one_line_error(fedsilo("sites", "--aggregator", plain, cwd=home, env=env))
    assert f"cannot reach the aggregator at {plain}:" in line
    ok(fedsilo("certs", "init", "--dir", "other-pki", cwd=home))
    line = one_line_error(fedsilo("job", "list", cwd=home, env={**env, "FEDSILO_CA": str(home / "other-pki/ca.crt")}))
    assert "its TLS certificate is not trusted" in line and env["FEDSILO_AGGREGATOR"] in line
    anonymous = {k: v for k, v in env.items() if k not in ("FEDSILO_CERT", "FEDSILO_KEY")}
    line = one_line_error(fedsilo("job", "list", cwd=home, env={**anonymous, "FEDSILO_CERT": "", "FEDSILO_KEY": ""}))
    assert "HTTP 401 no_identity" in line


def test_up_twice_is_refused_and_changes_nothing(home: Path) -> None:
    table = ProcessTable(home / "fed" / "run")
    before = {r.name: r.pid for r in table.running()}
    assert sorted(before) == ["agent-east", "agent-north", "agent-south", "aggregator", "broker"]
    line = one_line_error(fedsilo("local", "up", "-w", "fed", cwd=home))
    assert "is already running" in line and "fedsilo local down" in line
    assert {r.name: r.pid for r in table.running()} == before


def test_status_shows_each_process_and_site(home: Path) -> None:
    out = ok(fedsilo("local", "status", "-w", "fed", cwd=home))
    assert len(re.findall(r"running \(pid \d+\)", out)) == 5, out
    for site in SITES:
        assert re.search(rf"^  {site}\s+online\s+last seen", out, re.M), out


def _last_event(log: Path) -> dict[str, Any]:
    lines: list[dict[str, Any]] = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return lines[-1]


# Services this process started itself (restarts), by pid: reaped through their Popen, which would otherwise
# reap them behind our back once garbage-collected.
STARTED: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int, within: float = 30.0) -> int:
    """The exit code of a service this process adopted (see `adopter`) or started, once it has exited."""
    if pid in STARTED:
        return STARTED.pop(pid).wait(timeout=within)
    deadline = time.monotonic() + within
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} did not exit within {within:g}s")
        time.sleep(0.01)


def _sigterm(pid: int) -> tuple[int, float]:
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    code = _reap(pid)
    return code, time.monotonic() - t0


def test_sigterm_stops_the_services_cleanly_mid_job_and_nothing_is_lost(home: Path, adopter: None) -> None:
    """The aggregator and an agent are SIGTERMed in the middle of a job: each exits 0 at once, after its last log
    line, with its state intact; restarted, they finish the job with every round counted once."""
    fed = LocalFederation.open(home / "fed", detach=True)
    table = fed.processes
    job = yaml.safe_load((home / "job.yaml").read_text())
    job.update(name="outcome-long", rounds=12, round_deadline_s=120)
    job_id = fed.client.submit(yaml.safe_dump(job))
    wait_round(fed, job_id, 3)

    aggregator = table.get("aggregator")
    assert aggregator is not None
    code, aggregator_s = _sigterm(aggregator.pid)
    assert code == 0 and _last_event(fed.log("aggregator"))["event"] == "aggregator_stopped"
    with sqlite3.connect(fed.workdir / "state" / "aggregator.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fed.start_aggregator()
    assert fed.aggregator is not None
    STARTED[fed.aggregator.pid] = fed.aggregator
    wait_round(fed, job_id, 6)

    north = table.get("agent-north")
    assert north is not None
    code, agent_s = _sigterm(north.pid)
    assert code == 0 and _last_event(fed.log("agent-north"))["event"] == "agent_stopped"
    state = fed.workdir / "state" / "agent-north"
    verified = fedsilo("audit", "verify", str(state / "audit.log"), "--state", str(state / "agent.db"), cwd=home)
    assert verified.returncode == 0 and verified.stdout.startswith("OK:"), verified.stdout + verified.stderr
    fed.start_agent("north")
    STARTED[fed.agents["north"].pid] = fed.agents["north"]
    print(f"\nSIGTERM to exit, mid-job: aggregator {aggregator_s:.2f}s, agent {agent_s:.2f}s")

    summary = fed.wait_job(job_id, timeout=240)
    assert summary["state"] == "finished", summary["reason"]
    assert [h["sites_reporting"] for h in summary["history"][1:]] == [3] * 12
    sigma = JobSpec.from_yaml(yaml.safe_dump(job)).privacy.noise_multiplier
    for site in SITES:  # each round's release counted exactly once, across both restarts
        assert summary["sites"][site]["epsilon"] == pytest.approx(epsilon_for(sigma, 12, 1e-5), rel=1e-9)


def test_down_stops_everything_cleanly_and_keeps_the_workspace(home: Path, adopter: None) -> None:
    table = ProcessTable(home / "fed" / "run")
    running = table.running()
    assert sorted(r.name for r in running) == ["agent-east", "agent-north", "agent-south", "aggregator", "broker"]
    out = ok(fedsilo("local", "down", "-w", "fed", cwd=home))
    for rec in running:
        assert re.search(rf"^stopped {rec.name}\s+pid {rec.pid}\s+in \d+\.\d\ds$", out, re.M), out
        assert _reap(rec.pid) == 0, rec.name  # SIGTERM, clean exit: no SIGKILL was needed
    for name in ("aggregator", "agent-east", "agent-north", "agent-south"):
        assert _last_event(home / "fed" / "logs" / f"{name}.log")["event"] in ("aggregator_stopped", "agent_stopped")
    times = [float(t) for t in re.findall(r" in (\d+\.\d\d)s", out)]
    print(f"\nlocal down, seconds per process (SIGTERM to exit): {times}")
    assert not table.recorded()
    assert (home / "fed" / "federation.yaml").is_file() and (home / "fed" / "state" / "aggregator.db").is_file()
    line = one_line_error(fedsilo("local", "down", "-w", "fed", cwd=home))
    assert "nothing is running in" in line
