"""Experiment tracking end to end: a real federation (Mosquitto, the aggregator and two agent processes, real
training) whose aggregator logs to SageMaker Experiments through the real SDK, against moto's server mode,
and to the local sink; then the same with the SageMaker endpoint throttling every call.

Cleveland's policy shares per-site tracking; Hungary's does not, so nothing about Hungary may reach SageMaker.
The sink assumes a configured role through STS (moto) first, as a cross-account tracking set-up does.
moto implements every call the sink makes (CreateExperiment, CreateTrial, CreateTrialComponent, Search,
AssociateTrialComponent, UpdateTrialComponent, BatchPutMetrics, and S3 for the model artifact); it lacks
BatchGetMetrics, so the per-step series are read from the BatchPutMetrics requests the SDK sent (recorded by
the proxy in `aws.py`). The sink never calls CreateArtifact (no lineage graphs), so no Stubber is needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from click.testing import CliRunner

from fedsilo.cli import main
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.tracking.aws import REGION, SageMakerProxy, aws_env, moto_server
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
BUCKET = "fedsilo-tracking"
PREFIX = "fed-heart-disease"
ROLE = "arn:aws:iam::123456789012:role/fedsilo-tracking"


class Stack:
    def __init__(self, fed: LocalFederation, proxy: SageMakerProxy, moto_url: str) -> None:
        self.fed, self.proxy = fed, proxy
        self.sm = boto3.client("sagemaker", region_name=REGION, endpoint_url=moto_url,
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self.s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url,
                               aws_access_key_id="testing", aws_secret_access_key="testing")

    def run_job(self, rounds: int) -> dict[str, Any]:
        data = yaml.safe_load(EXAMPLE.read_text())
        data.update(rounds=rounds, sites=["cleveland", "hungary"], min_sites=2)
        job_id = self.fed.client.submit(yaml.safe_dump(data))
        summary = self.fed.wait_job(job_id, timeout=120)
        assert summary["state"] == "finished", summary["reason"]
        return summary

    def runs_of(self, exp: str) -> set[str]:
        """The experiment's runs (trial components); moto ignores the ExperimentName filter, so filter by name."""
        summaries = self.sm.list_trial_components(ExperimentName=exp)["TrialComponentSummaries"]
        return {t["TrialComponentName"] for t in summaries if t["TrialComponentName"].startswith(exp + "-")}

    def metrics(self) -> str:
        return bytes(self.fed.client.request("GET", "/metrics")).decode()

    def metric(self, name: str, sink: str) -> float | None:
        m = re.search(rf'^{name}{{sink="{sink}"}} (\S+)$', self.metrics(), re.M)
        return float(m.group(1)) if m else None

    def log_events(self, event: str) -> list[dict[str, Any]]:
        lines = self.fed.log("aggregator").read_text().splitlines()
        return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == event]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("tracking")
    files = split_by_center(root / "data")
    policies = {s: example_policy(s, {"heart-disease": files[s]}) for s in ("cleveland", "hungary")}
    policies["hungary"]["egress"]["share_tracking"] = False
    tracking = {
        "sagemaker": {"region": REGION, "experiment_prefix": PREFIX, "artifact_bucket": BUCKET, "max_attempts": 1,
                      "role_arn": ROLE},
        "retry_initial_s": 0.2, "retry_max_s": 1.0,
    }
    with moto_server(root) as moto_url, pytest.MonkeyPatch.context() as mp:
        proxy = SageMakerProxy(moto_url).start()
        for k, v in aws_env(proxy.url, moto_url).items():
            mp.setenv(k, v)  # the aggregator process inherits the environment (standard AWS chain)
        fed = LocalFederation(root, policies, heartbeat_s=1.0, aggregator_extra={"tracking": tracking})
        st = Stack(fed, proxy, moto_url)
        st.s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        try:
            with fed:
                yield st
        finally:
            proxy.stop()


def test_sagemaker_experiment_after_a_three_round_job(stack: Stack) -> None:
    summary = stack.run_job(rounds=3)
    job_id = summary["job_id"]
    exp = f"{PREFIX}-{job_id}"
    agg_tc, site_tc = f"{exp}-aggregator", f"{exp}-client-cleveland"
    wait_for(lambda: stack.metric("fedsilo_tracking_pending_records", "sagemaker") == 0
             and any(op == "UpdateTrialComponent" and b.get("TrialComponentName") == agg_tc
                     and "model" in b.get("OutputArtifacts", {}) for op, b in stack.proxy.calls),
             what="every record delivered to SageMaker")

    assert stack.sm.describe_experiment(ExperimentName=exp)["ExperimentName"] == exp
    assert stack.runs_of(exp) == {agg_tc, site_tc}  # Hungary's policy keeps its run out of tracking

    site = stack.sm.describe_trial_component(TrialComponentName=site_tc)
    params = {k: next(iter(v.values())) for k, v in site["Parameters"].items()}
    spec = summary["spec"]["hyperparameters"]
    last = summary["training"][-1]["sites"]["cleveland"]
    assert params["center"] == "cleveland"
    assert params["train_data_size"] == last["num_samples"]
    assert params["learning_rate"] == spec["learning_rate"] and params["batch_size"] == spec["batch_size"]
    assert params["client_optimizer"] == "sgd" and params["weight_decay"] == spec["weight_decay"]
    # The example job is per patient: DP-SGD, no update-level noise, and the ε logged says its unit.
    assert (params["dp_unit"], params["dp_noise_multiplier"], params["epsilon_unit"]) == ("record", 0.0, "record")
    assert params["epsilon"] == pytest.approx(last["epsilon"])
    assert site["Status"]["PrimaryStatus"] == "Completed"

    # Per-step series as the SDK sent them (BatchPutMetrics), against the job's own summary.
    series = stack.proxy.metric_series(site_tc)
    assert set(series) == {"Training:Loss", "Validation:AUC"}
    assert series["Training:Loss"] == pytest.approx(
        {t["round"]: t["sites"]["cleveland"]["train_loss"] for t in summary["training"]})
    assert series["Validation:AUC"] == pytest.approx(
        {h["round"]: h["sites"]["cleveland"]["auc"] for h in summary["history"]})
    assert sorted(series["Training:Loss"]) == [1, 2, 3] and sorted(series["Validation:AUC"]) == [0, 1, 2, 3]
    agg_series = stack.proxy.metric_series(agg_tc)
    assert set(agg_series) == {"Test:AUC", "Test:Loss"}
    assert agg_series["Test:AUC"] == pytest.approx({h["round"]: h["global"]["auc"] for h in summary["history"]})
    assert agg_series["Test:Loss"] == pytest.approx({h["round"]: h["global"]["loss"] for h in summary["history"]})
    # moto's per-metric summaries agree with the last point sent.
    agg = stack.sm.describe_trial_component(TrialComponentName=agg_tc)
    by_name = {m["MetricName"]: m for m in agg["Metrics"]}
    assert by_name["Test:AUC"]["Last"] == pytest.approx(summary["history"][-1]["global"]["auc"])
    agg_params = {k: next(iter(v.values())) for k, v in agg["Parameters"].items()}
    assert agg_params["rounds"] == 3 and agg_params["state"] == "finished" and agg_params["aggregation"] == "fedavg"
    # The final model went to S3 as the aggregator run's artifact.
    uri = agg["OutputArtifacts"]["model"]["Value"]
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    model = stack.fed.report_dir / job_id / "model.safetensors"
    assert stack.s3.get_object(Bucket=bucket, Key=key)["Body"].read() == model.read_bytes()
    # The sink assumed the configured role (STS) and signed every call with its temporary credentials.
    assert stack.proxy.access_keys and "testing" not in stack.proxy.access_keys
    # Nothing about Hungary reached the SageMaker endpoints.
    assert "hungary" not in json.dumps(stack.proxy.calls)


def test_local_report_of_a_short_job(stack: Stack, chromium: Any, artifacts_dir: Path) -> None:
    summary = stack.run_job(rounds=2)
    out = stack.fed.report_dir / summary["job_id"]
    def ended(run: str) -> bool:
        path = out / "params.json"
        return path.exists() and bool(json.loads(path.read_text()).get(run, {}).get("status") == "finished")

    # A run's files are complete once its end record is in: each run is delivered on its own, in turn.
    wait_for(lambda: stack.metric("fedsilo_tracking_pending_records", "local") == 0
             and ended("aggregator") and ended("client-cleveland"), what="local sink drained")
    for name in ("params.json", "metrics.jsonl", "metrics.csv", "curves-global.png", "curves-sites.png",
                 "report.html"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves-sites.png").read_bytes()[:4] == b"\x89PNG"
    # The CSV has every round for the global model and every site.
    with (out / "metrics.csv").open() as f:
        rows = [line.split(",")[:2] for line in f.read().splitlines()[1:]]
    assert {(int(r), s) for r, s in rows} == {(r, s) for r in range(3) for s in ("global", "cleveland", "hungary")}
    params = json.loads((out / "params.json").read_text())
    assert set(params) == {"aggregator", "client-cleveland"}
    assert params["client-cleveland"]["params"]["center"] == "cleveland"
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(p["run"], p["name"], p["step"]) for p in points if p["run"] == "client-cleveland"} == {
        ("client-cleveland", "Training:Loss", 1), ("client-cleveland", "Training:Loss", 2),
        *(("client-cleveland", "Validation:AUC", r) for r in range(3)),
    }

    # `fedsilo report JOB_ID` rebuilds the folder from the aggregator's state and config.
    for name in ("report.html", "params.json", "metrics.jsonl", "curves-sites.png"):
        (out / name).unlink()
    result = CliRunner().invoke(main, ["report", summary["job_id"], "--config", str(stack.fed.aggregator_config())])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.html")
    assert set(json.loads((out / "params.json").read_text())) == {"aggregator", "client-cleveland"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(points)
    unknown = CliRunner().invoke(main, ["report", "no-such-job", "--config", str(stack.fed.aggregator_config())])
    assert unknown.exit_code == 1 and "no job 'no-such-job'" in unknown.output

    page = chromium.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"external request {r.url}")
            if not r.url.startswith(("file:", "data:")) else None)
    page.goto((out / "report.html").as_uri())
    assert summary["job_id"] in page.inner_text("h1")
    assert page.locator("img").count() == 2
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 100)")
    text = page.inner_text("body")
    assert "finished" in text and "hungary" in text and "ε" in text
    page.screenshot(path=str(artifacts_dir / "tracking-report.png"), full_page=True)
    page.close()
    assert errors == []


def test_throttled_sagemaker_never_stalls_training_and_catches_up(stack: Stack) -> None:
    # Counters are the module's aggregator's since it started: count from here (a cold first delivery in an
    # earlier test may have failed and been retried).
    failing_before = len(stack.log_events("tracking_sink_failing"))
    failures_before = stack.metric("fedsilo_tracking_failures_total", "sagemaker") or 0
    throttled_before = stack.proxy.throttled
    stack.proxy.throttle = True
    summary = stack.run_job(rounds=2)  # training finishes while every SageMaker call is throttled
    exp = f"{PREFIX}-{summary['job_id']}"
    wait_for(lambda: (stack.metric("fedsilo_tracking_failures_total", "sagemaker") or 0) >= failures_before + 3,
             what="retries")
    assert (stack.metric("fedsilo_tracking_pending_records", "sagemaker") or 0) > 0
    assert stack.metric("fedsilo_tracking_sink_up", "sagemaker") == 0
    assert stack.proxy.throttled - throttled_before >= 3
    # One warning for the whole burst, not one per failed call.
    assert len(stack.log_events("tracking_sink_failing")) == failing_before + 1
    names = [e["ExperimentName"] for e in stack.sm.list_experiments()["ExperimentSummaries"]]
    assert exp not in names
    # The local sink is independent of the failing one.
    assert json.loads((stack.fed.report_dir / summary["job_id"] / "params.json").read_text())
    # The records are durable: an aggregator restart while the endpoint still throttles loses none of them.
    stack.fed.stop_aggregator()
    stack.fed.start_aggregator()
    assert (stack.metric("fedsilo_tracking_pending_records", "sagemaker") or 0) > 0
    wait_for(lambda: (stack.metric("fedsilo_tracking_failures_total", "sagemaker") or 0) >= 1, what="retrying")

    stack.proxy.throttle = False
    wait_for(lambda: stack.metric("fedsilo_tracking_pending_records", "sagemaker") == 0, what="outbox drained")
    assert stack.runs_of(exp) == {f"{exp}-aggregator", f"{exp}-client-cleveland"}
    series = stack.proxy.metric_series(f"{exp}-client-cleveland")
    assert sorted(series["Training:Loss"]) == [1, 2]
    assert stack.metric("fedsilo_tracking_sink_up", "sagemaker") == 1
    assert stack.log_events("tracking_sink_recovered")
