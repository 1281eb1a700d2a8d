"""What a job summary becomes in tracking, and the outbox that carries it: consent per site, stable keys,
nothing queued twice, nothing lost across a reopen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.tracking import TrackingConfig, default_outbox
from aggregator.tracking.outbox import Outbox
from aggregator.tracking.records import records_for, round_records
from federation.jobs import JobSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


def summary(state: str = "running", hungary_shares: tuple[bool, ...] = (True, False)) -> dict[str, Any]:
    """The shape `aggregator.report.job_summary` returns, for two training rounds at two sites."""
    spec = JobSpec.from_yaml(EXAMPLE.read_text()).model_dump(mode="json")
    training = [
        {"round": r, "sites": {
            "cleveland": {"train_loss": 0.6 - r / 10, "num_samples": 200, "epsilon": 5.0 * r, "share_tracking": True},
            "hungary": {"train_loss": 0.7 - r / 10, "num_samples": 196, "epsilon": 5.0 * r,
                        "share_tracking": hungary_shares[r - 1]},
        }} for r in (1, 2)
    ]
    history = [
        {"round": v, "complete": v < 2 or state != "running", "train_loss": None,
         "global": {"n": 200, "auc": 0.6 + v / 10, "loss": 0.7 - v / 10},
         "sites": {s: {"n": 100, "auc": 0.6 + v / 10, "loss": 0.7 - v / 10} for s in ("cleveland", "hungary")}}
        for v in (0, 1, 2)
    ]
    return {"job_id": "heart-disease-logreg-0a1b2c3d", "state": state, "round": 2, "spec": spec,
            "training": training, "history": history}


def test_a_site_that_once_withheld_consent_gets_no_run() -> None:
    recs = records_for(summary(), "fed-heart-disease")
    assert {r.run.name for r in recs} == {"aggregator", "client-cleveland"}
    assert all(r.run.experiment == "fed-heart-disease-heart-disease-logreg-0a1b2c3d" for r in recs)
    assert "hungary" not in "".join(r.model_dump_json() for r in recs)
    both = records_for(summary(hungary_shares=(True, True)), "fed-heart-disease")
    assert {r.run.name for r in both} == {"aggregator", "client-cleveland", "client-hungary"}


def test_a_jobs_experiment_tag_names_its_experiment() -> None:
    """A job imported from FedML carries `tags.experiment` (its `sm_experiment_name`): that wins over the prefix,
    made a valid SageMaker name."""
    s = summary()
    s["spec"]["tags"] = {"experiment": "Cardio FL_2026"}
    assert {r.run.experiment for r in records_for(s, "fed-heart-disease")} == {
        "cardio-fl-2026-heart-disease-logreg-0a1b2c3d"}


def test_without_a_prefix_the_experiment_is_named_after_the_job() -> None:
    assert {r.run.experiment for r in records_for(summary(), None)} == {"heart-disease-logreg-0a1b2c3d"}


def test_metrics_follow_the_issue_names_and_only_complete_global_rounds() -> None:
    recs = records_for(summary(), "fed-heart-disease")
    points = {(r.run.name, r.name, r.step) for r in recs if r.kind == "metric"}
    assert points == {
        ("aggregator", "Test:AUC", 0), ("aggregator", "Test:Loss", 0),
        ("aggregator", "Test:AUC", 1), ("aggregator", "Test:Loss", 1),  # version 2 is not complete yet
        ("client-cleveland", "Training:Loss", 1), ("client-cleveland", "Training:Loss", 2),
        *(("client-cleveland", "Validation:AUC", v) for v in (0, 1, 2)),
    }
    params = [r.params for r in recs if r.kind == "params" and r.run.name == "client-cleveland"]
    assert params[-1]["epsilon"] == 10.0 and params[-1]["train_data_size"] == 200
    assert params[-1]["client_optimizer"] == "sgd" and params[-1]["center"] == "cleveland"
    assert not [r for r in recs if r.kind == "end"]
    ended = records_for(summary("failed"), "fed-heart-disease")
    assert {(r.run.name, r.status) for r in ended if r.kind == "end"} == {
        ("aggregator", "failed"), ("client-cleveland", "failed")}


def test_the_outbox_queues_each_record_once_and_keeps_it_until_delivered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    running = records_for(summary(), "p")
    assert box.enqueue("sagemaker", running) == len(running)
    assert box.enqueue("sagemaker", running) == 0  # the next round's summary repeats the past
    ended = records_for(summary("finished"), "p")
    assert box.enqueue("sagemaker", ended) == len({r.key for r in ended} - {r.key for r in running})
    assert box.enqueue("local", running) == len(running)  # each sink has its own queue
    box.close()

    box = Outbox(path)  # a restart loses nothing
    pending = box.pending("sagemaker", 1000)
    assert [r.key for _, r in pending][: len(running)] == [r.key for r in running]
    box.mark_delivered([i for i, _ in pending])
    assert box.count_pending("sagemaker") == 0
    assert box.enqueue("sagemaker", ended) == 0  # delivered records are not sent again
    assert box.count_pending("local") == len(running)
    box.close()


def test_the_outbox_sits_beside_the_sqlite_state_whatever_form_its_url_takes() -> None:
    cfg, reports = TrackingConfig(), Path("/srv/reports")
    assert default_outbox(cfg, "sqlite:///state/aggregator.db", reports) == Path("state/tracking-outbox.db")
    assert default_outbox(cfg, "sqlite:////var/fedsilo/state.db", reports) == Path("/var/fedsilo/tracking-outbox.db")
    assert default_outbox(cfg, "postgresql://db/fedsilo", reports) == reports / ".tracking-outbox.db"
    assert default_outbox(TrackingConfig(outbox=Path("/x/o.db")), "sqlite:///s.db", reports) == Path("/x/o.db")


def test_a_closed_round_adds_only_its_own_records_and_a_withheld_site_stays_out() -> None:
    spec = summary()["spec"]
    withheld: set[str] = set()
    g = {"n": 200, "auc": 0.7, "loss": 0.5}

    def site(share: bool) -> dict[str, Any]:
        return {"train_loss": 0.5, "num_samples": 200, "epsilon": 3.0, "share_tracking": share}

    evals = {s: {"n": 100, "auc": 0.7, "loss": 0.5} for s in ("cleveland", "hungary")}
    recs = round_records("job-1", spec, None, 2, {"cleveland": site(True), "hungary": site(False)}, evals, g, withheld)
    assert {r.key for r in recs} == {
        "aggregator|params", "aggregator|Test:AUC|1", "aggregator|Test:Loss|1",
        "client-cleveland|params|2", "client-cleveland|Training:Loss|2", "client-cleveland|Validation:AUC|1",
    }
    assert withheld == {"hungary"}
    # Hungary shares again in round 3, but a site that once withheld gets no more records in this job.
    later = round_records("job-1", spec, None, 3, {"cleveland": site(True), "hungary": site(True)}, evals, g, withheld)
    assert not [r for r in later if r.run.name == "client-hungary"]
    assert {r.key for r in later if r.run.name == "client-cleveland"} == {
        "client-cleveland|params|3", "client-cleveland|Training:Loss|3", "client-cleveland|Validation:AUC|2"}
