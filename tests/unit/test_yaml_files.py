"""Policy, agent config and job files: a key given twice is refused, `true` is not a number, and every problem is one
line that names the file (and the line), from `fedsilo policy check/explain` and from agent start, never a
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.config import AgentConfig
from agent.policy import SitePolicy
from federation.jobs import JobSpec
from federation.yamlfile import ConfigFileError
from fedsilo.cli import main

ROOT = Path(__file__).resolve().parents[2]
POLICY = (ROOT / "policies" / "examples" / "hungary.yaml").read_text()
JOB = (ROOT / "examples" / "heart-disease.yaml").read_text()
assert "    min_cohort: 100\n" in POLICY and "min_sites: 3\n" in JOB


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "expected"), [
    (POLICY.replace("    min_cohort: 100\n", "    min_cohort: 100\n    min_cohort: 1\n"),
     "policy.yaml, line 11, column 5: duplicate key 'min_cohort' (first given on line 10)"),
    (POLICY.replace("min_cohort: 100", "min_cohort: true"),
     "policy.yaml: not a valid site policy: line 10: datasets.heart-disease.min_cohort: Input should be a valid "
     "integer"),
    (POLICY.replace("max_concurrent_jobs: 1", "max_concurrent_jobs: yes"),
     "line 34: operations.max_concurrent_jobs: Input should be a valid integer"),
    (POLICY.replace("min_noise_multiplier: 0.3", "min_noise_multiplier: false"),
     "privacy.min_noise_multiplier: Input should be a valid number"),
    (POLICY.replace("  heart-disease:\n", "  heart-disease: [\n", 1),
     "policy.yaml, line 7, column 5: expected ',' or ']'"),
    ("- just\n- a list\n", "policy.yaml: site policy must be a YAML mapping"),
])
def test_policy_file_problems_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "policy.yaml", text)
    with pytest.raises(ConfigFileError) as caught:
        SitePolicy.load(path)
    assert expected in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    out = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and expected in out.output, out.output
    job = write(tmp_path, "job.yaml", JOB)
    out = CliRunner().invoke(main, ["policy", "explain", str(path), str(job)])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and expected in out.output, out.output


def test_a_job_file_problem_in_policy_explain_is_one_refusal_line(tmp_path: Path) -> None:
    policy = write(tmp_path, "policy.yaml", POLICY)
    for text, expected in ((JOB.replace("min_sites: 3\n", "min_sites: 3\nmin_sites: 1\n"), "duplicate key 'min_sites'"),
                           (JOB.replace("rounds: 10", "rounds: [10"), "job.yaml, line")):
        job = write(tmp_path, "job.yaml", text)
        out = CliRunner().invoke(main, ["policy", "explain", str(policy), str(job)])
        assert out.exit_code == 1 and out.output.startswith("REFUSE") and expected in out.output, out.output
        assert out.output.count("\n") == 1
    with pytest.raises(ValueError, match="duplicate key 'min_sites'"):
        JobSpec.from_yaml(JOB.replace("min_sites: 3\n", "min_sites: 3\nmin_sites: 1\n"))


def agent_config(policy_file: Path, **extra: str) -> str:
    lines = {"site": "hungary", "policy_file": str(policy_file), "aggregator_public_key": "k.pub",
             "tls": "{ca_file: ca.crt}", "state_dir": "state", **extra}
    return "".join(f"{k}: {v}\n" for k, v in lines.items())


def test_agent_config_is_strict(tmp_path: Path) -> None:
    policy = write(tmp_path, "policy.yaml", POLICY)
    assert AgentConfig.load(write(tmp_path, "agent.yaml", agent_config(policy))).site == "hungary"
    for text, expected in ((agent_config(policy, heartbeat_s="true"), "line 6: heartbeat_s: Input should be a valid "
                                                                      "number"),
                           (agent_config(policy) + "site: cleveland\n", "duplicate key 'site'")):
        with pytest.raises(ConfigFileError, match=expected):
            AgentConfig.load(write(tmp_path, "agent.yaml", text))


@pytest.mark.parametrize(("config", "policy", "expected"), [
    ("site: hungary\nsite: x\n", POLICY, "agent.yaml, line 2, column 1: duplicate key 'site'"),
    (None, POLICY.replace("min_cohort: 100", "min_cohort: true"),
     "policy.yaml: not a valid site policy: line 10: datasets.heart-disease.min_cohort"),
])
def test_agent_start_prints_one_line_and_no_traceback(tmp_path: Path, config: str | None, policy: str,
                                                       expected: str) -> None:
    policy_file = write(tmp_path, "policy.yaml", policy)
    config_file = write(tmp_path, "agent.yaml", config or agent_config(policy_file))
    out = subprocess.run([sys.executable, "-m", "fedsilo", "agent", "run", "--config", str(config_file)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "FEDSILO_LOG_LEVEL": "CRITICAL"})
    assert out.returncode != 0 and expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr


def test_exponent_floats_read_as_numbers_as_in_yaml_1_2(tmp_path: Path) -> None:
    """PyYAML reads `1e-5` as text; under strict types a policy written so (or rendered by Helm) would not load."""
    text = POLICY.replace("delta: 1.0e-5, reset_period_days", "delta: 1e-5, reset_period_days")
    assert "delta: 1e-5," in text
    policy = SitePolicy.load(write(tmp_path, "policy.yaml", text))
    assert policy.privacy.budgets["heart-disease"].delta == 1e-5
