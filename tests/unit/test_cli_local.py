"""`fedsilo local init|up|down`, `demo --job` and `broker config` on bad input: each refusal is one clear line and
leaves nothing half-written. (The happy path runs for real in tests/integration/test_local_federation.py.)"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import yaml
from click.testing import CliRunner, Result

from federation.jobs import SITE_NAME, JobSpec, SiteName
from fedsilo.cli import main
from fedsilo.datasets import write_clinics
from fedsilo.localinit import MIN_COHORT, POLICY_LIMITS, site_policy
from fedsilo.workspace import Workspace

EXAMPLES = Path(__file__).resolve().parents[2] / "policies" / "examples"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def refused(result: Result) -> str:
    """Exit code 1 and one `Error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_clinics(tmp_path / "data", 160)  # 106 training records each: above min_cohort 100
    return tmp_path / "data"


@pytest.fixture
def job(tmp_path: Path, data: Path) -> Path:
    out = tmp_path / "job.yaml"
    result = run("job", "init", "--csv", str(data / "north.csv"), "--target", "outcome", "--positive", "relapse",
                 "--sites", "north,south,east", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def occupied() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_init_refuses_a_csv_without_the_target_column(tmp_path: Path, data: Path, job: Path) -> None:
    (data / "south.csv").write_text("age,bmi\n60,25\n")
    line = refused(run("local", "init", "-w", str(tmp_path / "ws"), "--data", str(data), "--job", str(job)))
    assert f"site south: {data / 'south.csv'} has no column 'outcome' (the job's target); its columns are: age, bmi" \
        in line
    assert not (tmp_path / "ws").exists()


def test_init_refuses_two_sites_on_one_file(tmp_path: Path, data: Path, job: Path) -> None:
    args = ["--site", f"north={data / 'north.csv'}", "--site", f"south={data / 'north.csv'}",
            "--site", f"east={data / 'east.csv'}"]
    line = refused(run("local", "init", "-w", str(tmp_path / "ws"), *args, "--job", str(job)))
    assert f"sites north and south both point to {data / 'north.csv'}: each site holds its own file" in line
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("name", ["North", "north_clinic", "a/b", "-x", "x" * 64, "clinic#1"])
def test_init_refuses_a_site_name_that_is_not_a_valid_certificate_cn(tmp_path: Path, data: Path, job: Path,
                                                                      name: str) -> None:
    line = refused(run("local", "init", "-w", str(tmp_path / "ws"), "--site", f"{name}={data / 'north.csv'}",
                       "--job", str(job)))
    assert f"{name!r} is not a valid site name (certificate CN and MQTT topic segment)" in line
    assert not (tmp_path / "ws").exists()


def test_init_refuses_a_port_in_use(tmp_path: Path, data: Path, job: Path, occupied: int) -> None:
    line = refused(run("local", "init", "-w", str(tmp_path / "ws"), "--data", str(data), "--job", str(job),
                       "--aggregator-port", str(occupied)))
    assert f"port {occupied} on 127.0.0.1 (asked for the aggregator) is in use by another process" in line
    assert not (tmp_path / "ws").exists()


def test_init_refuses_a_job_naming_sites_the_federation_lacks(tmp_path: Path, data: Path, job: Path) -> None:
    line = refused(run("local", "init", "-w", str(tmp_path / "ws"), "--site", f"north={data / 'north.csv'}",
                       "--site", f"south={data / 'south.csv'}", "--job", str(job)))
    assert "the job lists site(s) east that this federation does not have; job sites: north, south, east; " \
           "federation sites: north, south" in line
    assert not (tmp_path / "ws").exists()


def test_init_never_overwrites_without_force(tmp_path: Path, data: Path, job: Path) -> None:
    ws = tmp_path / "ws"
    assert run("local", "init", "-w", str(ws), "--data", str(data), "--job", str(job)).exit_code == 0
    policy = ws / "config" / "policy-north.yaml"
    policy.write_text(policy.read_text().replace("min_cohort: 100", "min_cohort: 80"))  # a site's review
    before = files_under(ws)
    line = refused(run("local", "init", "-w", str(ws), "--data", str(data), "--job", str(job)))
    assert "already holds a local federation" in line and "--force" in line
    assert files_under(ws) == before
    assert run("local", "init", "-w", str(ws), "--data", str(data), "--job", str(job), "--force").exit_code == 0
    assert "min_cohort: 100" in policy.read_text()
    assert files_under(ws / "pki") == {k.removeprefix("pki/"): v for k, v in before.items() if k.startswith("pki/")}


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path, data: Path, job: Path, occupied: int) -> None:
    ws = tmp_path / "ws"
    assert run("local", "init", "-w", str(ws), "--data", str(data), "--job", str(job),
               "--broker-port", str(occupied)).exit_code == 1  # refused at init already...
    assert run("local", "init", "-w", str(ws), "--data", str(data), "--job", str(job)).exit_code == 0
    manifest = yaml.safe_load((ws / "federation.yaml").read_text())
    with socket.socket() as s:  # ...and at `up`, when another process took a port since
        s.bind(("127.0.0.1", manifest["ports"]["broker"]))
        s.listen()
        line = refused(run("local", "up", "-w", str(ws)))
    assert f"port(s) {manifest['ports']['broker']} (broker) on 127.0.0.1 are in use by another process" in line
    assert not (ws / "run").exists() or not list((ws / "run").iterdir())


def test_down_with_nothing_running(tmp_path: Path, data: Path, job: Path) -> None:
    ws = tmp_path / "ws"
    assert run("local", "init", "-w", str(ws), "--data", str(data), "--job", str(job)).exit_code == 0
    assert f"nothing is running in {ws}" in refused(run("local", "down", "-w", str(ws)))
    assert "no local federation in" in refused(run("local", "down", "-w", str(tmp_path / "elsewhere")))


def test_demo_refuses_a_job_for_other_sites_at_once(tmp_path: Path, job: Path) -> None:
    line = refused(run("demo", "--workdir", str(tmp_path / "demo"), "--job", str(job)))
    assert "lists site(s) north, south, east that the demo federation does not have; job sites: north, south, " \
           "east; demo sites: cleveland, hungary, switzerland, va-long-beach" in line
    assert not (tmp_path / "demo").exists()


def test_init_policies_allow_only_the_sites_file_and_the_jobs_columns(tmp_path: Path, data: Path, job: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    result = run("local", "init", "-w", str(ws.root), "--data", str(data), "--job", str(job))
    assert result.exit_code == 0, result.output
    assert result.output.count("would ACCEPT job 'outcome-logreg'") == 3
    for site in ("north", "south", "east"):
        text = ws.policy_file(site).read_text()
        assert text.startswith(f"# Site policy of {site}, written by `fedsilo local init`")
        policy = yaml.safe_load(text)
        assert list(policy["datasets"]) == ["outcome"]
        ds = policy["datasets"]["outcome"]
        assert ds["path"] == str(data / f"{site}.csv")
        assert ds["allowed_columns"] == ["age", "bmi", "length_of_stay", "prior_admissions", "ward", "smoker",
                                         "admission"]
        assert (ds["target"], ds["allowed_purposes"]) == ("outcome", ["research"])
    env = ws.operator_env.read_text()
    assert re.search(r"^export FEDSILO_AGGREGATOR=https://127\.0\.0\.1:\d+$", env, re.M)


def test_policy_defaults_are_the_examples_shared_limits() -> None:
    examples = [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))]

    def most_common(values: list[object]) -> object:
        return max(values, key=lambda v: (values.count(v), str(v)))

    for section in ("privacy", "egress", "models", "operations"):
        for key, value in POLICY_LIMITS[section].items():
            assert value == most_common([e[section][key] for e in examples]), (section, key)
    budgets = [b for e in examples for b in e["privacy"]["budgets"].values()]
    for key, value in POLICY_LIMITS["budget"].items():
        assert value == most_common([b[key] for b in budgets]), key
    assert most_common([d["min_cohort"] for e in examples for d in e["datasets"].values()]) == MIN_COHORT
    spec = JobSpec.from_yaml((EXAMPLES.parents[1] / "examples" / "heart-disease.yaml").read_text())
    policy = site_policy("x", Path("/x.csv"), spec)
    assert policy["privacy"]["budgets"] == {"heart-disease": POLICY_LIMITS["budget"]}
    assert policy["egress"]["allowed_endpoints"] == []  # filled with the federation's own broker and aggregator


def test_site_names_follow_the_job_models_rule() -> None:
    assert SITE_NAME.pattern == get_args(SiteName)[1].metadata[0].pattern


def test_broker_config_refuses_bad_sites_and_overwrites_only_with_force(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert "no broker certificate" in refused(run("broker", "config", "--sites", "a,b", "--dir", str(pki),
                                                  "--out", str(tmp_path / "broker")))
    assert run("certs", "init", "--dir", str(pki)).exit_code == 0
    assert run("certs", "issue-broker", "--dir", str(pki)).exit_code == 0
    assert "'Bad' is not a valid site name" in refused(run("broker", "config", "--sites", "a,Bad", "--dir", str(pki),
                                                           "--out", str(tmp_path / "broker")))
    assert not (tmp_path / "broker").exists()
    ok = run("broker", "config", "--sites", "a,b", "--dir", str(pki), "--out", str(tmp_path / "broker"))
    assert ok.exit_code == 0, ok.output
    assert "exist(s); pass --force" in refused(run("broker", "config", "--sites", "a", "--dir", str(pki),
                                                   "--out", str(tmp_path / "broker")))
