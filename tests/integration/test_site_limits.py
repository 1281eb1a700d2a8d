"""A site's limits against a real broker, aggregator and agents: jobs that break the cohort, data, compute and time
rules are refused or stopped with a reason the operator sees in the job's status; reasons leave the hospital naming
datasets, never the data's location; and the audit chain's head the aggregator keeps exposes a rewritten local log.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from fedsilo.cli import main
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.auditlog import rechain
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
WARD = "zz-ward-7b-confidential"  # a folder name that must never reach the aggregator
SITE_UNIT = {"unit": "site", "clip_norm": 0.5, "noise_multiplier": 2.0, "delta": 1e-5}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("limits")
    files = split_by_center(root / WARD)
    hungary = example_policy("hungary", {"heart-disease": files["hungary"]})
    ds = hungary["datasets"]["heart-disease"]
    ds["min_cohort"] = 150  # 293 records: enough only while a job holds out less than half
    ds["allowed_columns"].append("lvef")  # allowed, but not in the file
    hungary["datasets"]["heart-disease-2024"] = {**ds, "path": str(root / WARD / "hungary-2024.csv")}
    hungary["privacy"]["budgets"]["heart-disease-2024"] = hungary["privacy"]["budgets"]["heart-disease"]
    cleveland = example_policy("cleveland", {"heart-disease": files["cleveland"]})
    cleveland["compute"] = {"max_local_steps_per_round": 10_000_000, "max_examples_per_round": 10**9}
    for p in (hungary, cleveland):
        p["operations"]["max_concurrent_jobs"] = 5
    with LocalFederation(root, {"hungary": hungary, "cleveland": cleveland}, heartbeat_s=1.0) as f:
        yield f


def job_yaml(site: str, **changes: Any) -> str:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(sites=[site], min_sites=1, rounds=1, privacy=SITE_UNIT, accept_deadline_s=30)
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return yaml.safe_dump(data)


def audit_entries(fed: LocalFederation, site: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (fed.workdir / f"state/agent-{site}/audit.log").read_text().splitlines()]


def test_jobs_breaking_the_sites_rules_are_refused_with_reasons_that_name_no_local_path(
    fed: LocalFederation,
) -> None:
    numeric = [*yaml.safe_load(EXAMPLE.read_text())["features"]["numeric"], "lvef"]
    cases = {
        "the job would train on 146 records (147 of 293 held out by validation_fraction 0.5), below this site's "
        "minimum cohort of 150 training records": job_yaml("hungary", dataset={"validation_fraction": 0.5}),
        "column(s) missing from data file [dataset heart-disease]: ['lvef']":
            job_yaml("hungary", features={"numeric": numeric}),
        "data file [dataset heart-disease-2024] does not exist": job_yaml("hungary", dataset={"name":
                                                                                             "heart-disease-2024"}),
        "a round would take 195000 optimizer steps here (1000 epochs × ceil(195 training records / batch size 1)), "
        "above this site's maximum 10000": job_yaml("hungary", hyperparameters={"epochs": 1000, "batch_size": 1}),
    }
    jobs = {reason: fed.client.submit(text) for reason, text in cases.items()}
    for reason, job_id in jobs.items():
        summary = fed.wait_job(job_id, timeout=60)
        assert summary["state"] == "failed"
        assert summary["sites"]["hungary"]["reasons"] == [reason], summary["sites"]["hungary"]
        assert WARD not in json.dumps(summary)
    # Off-site: nowhere in the aggregator's answers or its database. On-site: the audit keeps the path.
    assert WARD not in json.dumps(fed.client.decisions("hungary"))
    central = [p for d in ("state", "reports", "logs", "broker") for p in (fed.workdir / d).rglob("*")
               if p.is_file() and "agent" not in str(p.relative_to(fed.workdir))]
    assert central and not [p for p in central if WARD.encode() in p.read_bytes()]
    local = [e for e in audit_entries(fed, "hungary") if e.get("job_id") in jobs.values()]
    assert sum(WARD in " ".join(e["reasons"]) for e in local) == 2  # the missing column and the missing file


def test_a_round_that_runs_past_its_deadline_is_stopped_unreleased_and_uncharged(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml("cleveland", round_deadline_s=4,
                                        hyperparameters={"epochs": 1000, "batch_size": 1}))
    summary = fed.wait_job(job_id, timeout=90)
    assert summary["state"] == "failed"
    # The site and the aggregator stop at the same deadline: the site's report may arrive after the job failed.
    rejections: list[dict[str, Any]] = []

    def reported() -> bool:
        rejections[:] = [r for r in fed.client.request("GET", f"/api/v1/rejections?job_id={job_id}")
                         if r["reason"] == "site_error"]
        return bool(rejections)

    wait_for(reported, within=30, what="cleveland's report of the stopped round", every=0.2)
    [rejection] = rejections
    assert "local training reached the round's deadline" in rejection["detail"], rejection
    assert "nothing was released or charged" in rejection["detail"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{fed.status_ports['cleveland']}/metrics", timeout=5).read()
    assert re.search(rb'fedsilo_agent_rounds_not_released_total\{reason="stopped"\} 1\.0', metrics)
    assert re.search(rb'fedsilo_agent_epsilon_spent\{dataset="heart-disease",unit="site"\} 0\.0', metrics)
    [entry] = [e for e in audit_entries(fed, "cleveland") if e["event"] == "round_not_released"
               and e["job_id"] == job_id]
    assert (entry["round"], entry["why"]) == (1, "stopped")


def test_the_aggregators_audit_head_exposes_a_rewritten_local_log(fed: LocalFederation, tmp_path: Path) -> None:
    fed.wait_job(fed.client.submit(job_yaml("hungary", dataset={"validation_fraction": 0.5})), timeout=60)
    log = fed.workdir / "state/agent-hungary/audit.log"
    lines = log.read_text().splitlines()
    local_head = json.loads(lines[-1])

    head: dict[str, Any] = {}

    def recorded() -> bool:
        head.update(fed.client.request("GET", "/api/v1/sites/hungary/audit-head"))
        return bool(head["seq"] == local_head["seq"])

    wait_for(recorded, within=30, what="the aggregator to record hungary's latest audit head", every=0.2)
    assert head["sha256"] == local_head["hash"] and head["conflicts"] == 0
    answer = tmp_path / "head.json"
    answer.write_text(json.dumps(head))
    forged = tmp_path / "audit.log"
    forged.write_text(rechain(lines, edit_seq=local_head["seq"] - 1, decision="accepted"))  # the refusal before last
    runner = CliRunner()
    assert runner.invoke(main, ["audit", "verify", str(forged)]).exit_code == 0  # consistent on its own
    out = runner.invoke(main, ["audit", "verify", str(forged), "--aggregator-head", str(answer)])
    assert out.exit_code == 1 and "the chain was rewritten and re-chained" in out.output, out.output
    honest = runner.invoke(main, ["audit", "verify", str(log), "--aggregator-head", str(answer)])
    assert honest.exit_code == 0 and "chain intact" in honest.output
