"""The local sink: each job's tracking records as plain files beside its report, for networks without AWS.

Append-only, so a record costs the same in the first round of a ten-site job and the thirtieth of a thousand-site
one: `<report_dir>/<job>/metrics.jsonl` gets one line per metric point (each point once), `params.jsonl` one line
per parameters or status change of a run; both are appended once per delivered batch (`flush`). `params.json`,
every run's latest parameters and status in one file, is written when the job's aggregator run ends (and by
`fedsilo report`). A job's state is read from its files once per process, when the job is first touched, and
dropped when the job ends.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.tracking.records import AGGREGATOR_RUN
from aggregator.tracking.sink import Param, RunRef

PARAMS_LOG, METRICS_LOG, PARAMS = "params.jsonl", "metrics.jsonl", "params.json"


@dataclass
class _JobFiles:
    root: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> experiment, status, params, artifacts
    points: set[tuple[str, str, int]] = field(default_factory=set)  # (run, metric, step) already written
    params_lines: list[str] = field(default_factory=list)  # waiting for `flush`
    metric_lines: list[str] = field(default_factory=list)
    ended: bool = False  # the aggregator run ended in this batch: write params.json at `flush`

    @classmethod
    def load(cls, root: Path) -> _JobFiles:
        root.mkdir(parents=True, exist_ok=True)
        job = cls(root)
        for line in _lines(root / PARAMS_LOG):
            job._apply(json.loads(line))
        for line in _lines(root / METRICS_LOG):
            p = json.loads(line)
            job.points.add((p["run"], p["name"], p["step"]))
        return job

    def run(self, ref: RunRef) -> dict[str, Any]:
        return self.runs.setdefault(ref.name, {"experiment": ref.experiment, "status": "running", "params": {}})

    def change(self, ref: RunRef, **change: Any) -> None:
        entry = {"run": ref.name, "experiment": ref.experiment, **change}
        self._apply(entry)
        self.params_lines.append(json.dumps(entry, sort_keys=True))

    def _apply(self, entry: dict[str, Any]) -> None:
        run = self.runs.setdefault(entry["run"], {"experiment": entry["experiment"], "status": "running",
                                                  "params": {}})
        run["params"].update(entry.get("params", {}))
        if "status" in entry:
            run["status"] = entry["status"]
        if "artifacts" in entry:
            run.setdefault("artifacts", {}).update(entry["artifacts"])


class LocalSink:
    name = "local"

    def __init__(self, report_dir: Path) -> None:
        self._root = report_dir
        self._jobs: dict[str, _JobFiles] = {}
        self._run: RunRef | None = None

    def _job(self) -> _JobFiles:
        assert self._run is not None, "start_run first"
        return self._jobs[self._run.job_id]

    def start_run(self, run: RunRef) -> None:
        if run.job_id not in self._jobs:
            self._jobs[run.job_id] = _JobFiles.load(self._root / run.job_id)
        self._run = run
        self._job().run(run)

    def log_parameters(self, params: Mapping[str, Param]) -> None:
        assert self._run is not None
        self._job().change(self._run, params=dict(params))

    def log_metric(self, name: str, value: float, step: int) -> None:
        assert self._run is not None
        job = self._job()
        key = (self._run.name, name, step)
        if key not in job.points:
            job.points.add(key)
            job.metric_lines.append(json.dumps({"run": key[0], "name": name, "step": step, "value": value}))

    def log_artifact(self, name: str, path: Path) -> None:
        assert self._run is not None
        job = self._job()
        target = job.root / path.name
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        job.change(self._run, artifacts={name: path.name})

    def end_run(self, ok: bool, final_status: str | None = None) -> None:
        run, self._run = self._run, None
        if ok and run is not None and final_status is not None:
            job = self._jobs[run.job_id]
            job.change(run, status=final_status)
            job.ended = job.ended or run.name == AGGREGATOR_RUN

    def flush(self) -> None:
        """Append what the batch logged (fsynced, since the outbox marks it delivered next); write `params.json`
        for jobs whose aggregator run ended, and forget them."""
        for job_id, job in list(self._jobs.items()):
            _append(job.root / PARAMS_LOG, job.params_lines)
            _append(job.root / METRICS_LOG, job.metric_lines)
            job.params_lines, job.metric_lines = [], []
            if job.ended:
                _write_params_json(job)
                del self._jobs[job_id]

    def write_params(self, job_id: str) -> None:
        """`params.json` of a job now, whatever its state (`fedsilo report`)."""
        self.flush()
        _write_params_json(_JobFiles.load(self._root / job_id))


def _write_params_json(job: _JobFiles) -> None:
    tmp = job.root / (PARAMS + ".tmp")
    tmp.write_text(json.dumps(job.runs, indent=2, sort_keys=True))
    os.replace(tmp, job.root / PARAMS)


def _lines(path: Path) -> list[str]:
    """The complete lines of an append-only file. A line cut short by a crash mid-append is dropped from the file
    too, so the next append starts on a line of its own (the outbox delivers that record again)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return data[:end].decode().splitlines()


def _append(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    with path.open("a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
