"""Site policies: the examples are valid, the schema file is current, every rule refuses with its reason."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from agent.daemon import load_data
from agent.policy import OperationsPolicy, SitePolicy, describe, evaluate, policy_json_schema
from federation.jobs import JobSpec
from fedsilo.certs import CertError, Pki
from fedsilo.cli import main
from fedsilo.datasets import split_by_center

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "policies" / "examples").glob("*.yaml"))
# The rules below are the site unit's (update-level noise); the record unit's are in test_record_dp.py.
JOB = {**yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text()),
       "model": {"name": "logreg"},
       "privacy": {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.4, "delta": 1e-5}}


def test_there_is_one_valid_example_policy_per_center() -> None:
    assert [p.stem for p in EXAMPLES] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    for path in EXAMPLES:
        policy = SitePolicy.load(path)
        assert policy.site == path.stem
        assert any("allows only what follows" in line for line in describe(policy))


def test_committed_schema_is_current() -> None:
    assert (ROOT / "policies" / "schema.json").read_text() == policy_json_schema()
    assert json.loads(policy_json_schema())["title"] == "fedsilo site policy"


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> SitePolicy:
    files = split_by_center(tmp_path_factory.mktemp("d"))
    p = SitePolicy.load(ROOT / "policies" / "examples" / "hungary.yaml")
    ds = p.datasets["heart-disease"].model_copy(update={"path": files["hungary"]})
    egress = p.egress.model_copy(update={"allowed_endpoints": ["agg:443", "mq:8883"]})
    return p.model_copy(update={"datasets": {"heart-disease": ds}, "egress": egress})


def decide(policy: SitePolicy, spent: float = 0.0, active: int = 0, now: dt.datetime | None = None,
           **changes: Any) -> list[str]:
    job = json.loads(json.dumps(JOB))
    for key, value in changes.items():
        if isinstance(value, dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    spec = JobSpec.model_validate(job)
    d, data = evaluate(policy, spec, "hungary", endpoints=["agg:443", "mq:8883"], spent={"site": spent},
                       active_jobs=active, load=load_data, now=now)
    assert (data is not None) == d.accepted
    return d.reasons


def test_the_demo_job_is_accepted(policy: SitePolicy) -> None:
    assert decide(policy) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"purpose": "marketing"}, "purpose 'marketing' is not allowed"),
        ({"dataset": {"name": "genomes"}}, "dataset 'genomes' is not offered"),
        ({"privacy": {"noise_multiplier": 0.1}}, "below this site's floor"),
        ({"privacy": {"clip_norm": 5.0}}, "above this site's ceiling"),
        ({"privacy": {"delta": 1e-3}}, "δ 0.001 is above"),
        ({"rounds": 60}, "exceeds this site's per-job maximum"),
        ({"metrics": ["auc", "age"]}, "metric(s) not allowed to leave: ['age']"),
        ({"model": {"name": "mlp", "hidden": [4096, 4096]}}, "above this site's maximum"),
        ({"sites": ["cleveland"], "min_sites": 1}, "does not list this site"),
    ],
)
def test_each_rule_refuses_with_its_reason(policy: SitePolicy, changes: dict[str, Any], reason: str) -> None:
    reasons = decide(policy, **changes)
    assert any(reason in r for r in reasons), reasons


def test_columns_and_target_outside_the_policy_are_refused_before_any_read(policy: SitePolicy) -> None:
    features = json.loads(json.dumps(JOB["features"]))
    features["numeric"] = [*features["numeric"], "id"]
    reasons = decide(policy, features=features)
    assert any("column(s) not allowed: ['id']" in r for r in reasons)


def test_budget_and_concurrency_and_windows(policy: SitePolicy) -> None:
    assert any("exceeds the remaining budget" in r for r in decide(policy, spent=290.0))
    assert any("already running 1 job" in r for r in decide(policy, active=1))
    ops = OperationsPolicy.model_validate(
        {"max_concurrent_jobs": 1, "training_windows": [{"days": ["sat", "sun"], "start": "00:00", "end": "24:00"}]})
    weekend_only = policy.model_copy(update={"operations": ops})
    monday = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    saturday = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    assert any("training windows" in r for r in decide(weekend_only, now=monday))
    assert decide(weekend_only, now=saturday) == []


def test_a_cohort_below_the_minimum_is_refused(policy: SitePolicy) -> None:
    ds = policy.datasets["heart-disease"].model_copy(update={"min_cohort": 1000})
    strict = policy.model_copy(update={"datasets": {"heart-disease": ds}})
    assert any("the job would train on 195 records (98 of 293 held out by validation_fraction 0.333333), below "
               "this site's minimum cohort of 1000 training records" in r for r in decide(strict)), decide(strict)


def test_policy_explain_and_check_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["policy", "check", str(EXAMPLES[0])])
    assert out.exit_code == 0 and "everything else is refused" in out.output
    bad_job = dict(JOB, purpose="marketing")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(bad_job))
    out = runner.invoke(main, ["policy", "explain", str(EXAMPLES[1]), str(job_file)])
    assert out.exit_code == 1 and "REFUSE" in out.output and "purpose 'marketing'" in out.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("site: x\nprivacy: {}\n")
    out = runner.invoke(main, ["policy", "check", str(broken)])
    assert out.exit_code != 0 and "not a valid policy" in out.output


def test_certificates_are_private_and_never_overwritten_silently(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init()
    issued = pki.issue("site", "cleveland")
    for path in (pki.ca_key, pki.ca_cert, pki.signing_key, issued.key, issued.cert):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with pytest.raises(CertError, match="--force"):
        pki.init()
    with pytest.raises(CertError, match="--force"):
        pki.issue("site", "cleveland")
    before = issued.cert.read_bytes()
    pki.issue("site", "cleveland", force=True)
    assert issued.cert.read_bytes() != before
    runner = CliRunner()
    out = runner.invoke(main, ["certs", "issue-site", "cleveland", "--dir", str(tmp_path / "pki")])
    assert out.exit_code != 0 and "--force" in out.output
    out = runner.invoke(main, ["certs", "issue-site", "hungary", "--dir", str(tmp_path / "pki")])
    assert out.exit_code == 0 and (tmp_path / "pki" / "site" / "hungary.crt").exists()
