"""The local sink appends: a record costs the same late in a long job as early, a redelivered point is written
once, a line cut short by a crash does not corrupt the next one, and params.json appears when the job ends."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.tracking.local import LocalSink
from aggregator.tracking.sink import Record, RunRef, deliver

AGG = RunRef(job_id="job-1", experiment="job-1", name="aggregator")
SITE = RunRef(job_id="job-1", experiment="job-1", name="client-cleveland")


def metric(run: RunRef, step: int, value: float = 0.5) -> Record:
    return Record(key=f"{run.name}|m|{step}", run=run, kind="metric", name="Training:Loss", value=value, step=step)


def test_points_are_appended_once_and_params_json_waits_for_the_end(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path)
    deliver(sink, SITE, [Record(key="p", run=SITE, kind="params", params={"center": "cleveland"}), metric(SITE, 1)])
    sink.flush()
    out = tmp_path / "job-1"
    assert not (out / "params.json").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    before = (out / "metrics.jsonl").read_bytes()
    deliver(sink, SITE, [metric(SITE, 1), metric(SITE, 2)])  # step 1 again: a retried delivery
    sink.flush()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert (out / "metrics.jsonl").read_bytes().startswith(before)  # appended, not rewritten

    deliver(sink, SITE, [Record(key="e", run=SITE, kind="end", status="finished")])
    deliver(sink, AGG, [Record(key="a", run=AGG, kind="params", params={"rounds": 2}),
                        Record(key="ae", run=AGG, kind="end", status="finished")])
    sink.flush()
    params = json.loads((out / "params.json").read_text())
    assert params["client-cleveland"] == {
        "experiment": "job-1", "status": "finished", "params": {"center": "cleveland"}}
    assert params["aggregator"]["params"] == {"rounds": 2} and params["aggregator"]["status"] == "finished"


def test_a_new_process_reads_the_files_once_and_drops_a_torn_line(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path)
    deliver(sink, SITE, [metric(SITE, 1)])
    sink.flush()
    log = tmp_path / "job-1" / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"run": "client-cleveland", "na')  # a crash mid-append
    again = LocalSink(tmp_path)  # a restarted aggregator
    deliver(again, SITE, [metric(SITE, 1), metric(SITE, 2)])
    again.flush()
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
