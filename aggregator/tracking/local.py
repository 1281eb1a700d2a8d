"""The local sink: each job's tracking records as plain files beside its report, for networks without AWS.

`<report_dir>/<job>/params.json` holds every run's latest parameters and status; `metrics.jsonl` one line per
metric point (run, name, step, value), each point once. Files are replaced atomically, so a reader never sees
half a file and a repeated delivery changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aggregator.tracking.sink import Param, RunRef


class LocalSink:
    name = "local"

    def __init__(self, report_dir: Path) -> None:
        self._root = report_dir
        self._run: RunRef | None = None
        self._params: dict[str, Any] = {}
        self._points: dict[tuple[str, str, int], float] = {}

    def _dir(self) -> Path:
        assert self._run is not None, "start_run first"
        return self._root / self._run.job_id

    def start_run(self, run: RunRef) -> None:
        self._run = run
        d = self._dir()
        d.mkdir(parents=True, exist_ok=True)
        params = d / "params.json"
        self._params = json.loads(params.read_text()) if params.exists() else {}
        self._params.setdefault(run.name, {"experiment": run.experiment, "status": "running", "params": {}})
        self._points = {}
        metrics = d / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                p = json.loads(line)
                self._points[(p["run"], p["name"], p["step"])] = p["value"]

    def log_parameters(self, params: Mapping[str, Param]) -> None:
        assert self._run is not None
        self._params[self._run.name]["params"].update(params)

    def log_metric(self, name: str, value: float, step: int) -> None:
        assert self._run is not None
        self._points[(self._run.name, name, step)] = value

    def log_artifact(self, name: str, path: Path) -> None:
        assert self._run is not None
        target = self._dir() / path.name
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        self._params[self._run.name].setdefault("artifacts", {})[name] = path.name

    def end_run(self, ok: bool, final_status: str | None = None) -> None:
        if not ok or self._run is None:
            self._run = None
            return
        if final_status is not None:
            self._params[self._run.name]["status"] = final_status
        d = self._dir()
        _atomic_write(d / "params.json", json.dumps(self._params, indent=2, sort_keys=True))
        lines = [
            json.dumps({"run": run, "name": name, "step": step, "value": value})
            for (run, name, step), value in sorted(self._points.items())
        ]
        _atomic_write(d / "metrics.jsonl", "".join(line + "\n" for line in lines))
        self._run = None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
