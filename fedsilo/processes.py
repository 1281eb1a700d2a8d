"""The background processes of a local federation, found again by pid file from any later command.

`fedsilo local up` starts the broker, the aggregator and the agents and returns; `status` and `down` run as new
processes that never held those children. Each start therefore writes `<run>/<name>.pid` (the pid and the
process's start time from /proc), and a process counts as ours only while a process with that pid *and* that start
time exists and is not a zombie: a pid reused by the system after a crash is never signalled.

Linux only (/proc), like the rest of the local launcher (Debian's Mosquitto).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessTable", "Recorded", "Stopped", "start_time", "stop_pid"]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat), None if it is gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


def _alive(pid: int, started: int | None) -> bool:
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):  # exited; a zombie waits only for its parent to reap it
        return False
    return started is None or int(fields[19]) == started


@dataclass(frozen=True)
class Recorded:
    name: str
    pid: int
    started: int | None

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.started)


@dataclass(frozen=True)
class Stopped:
    name: str
    pid: int
    seconds: float
    how: str  # "SIGTERM", "SIGKILL" (the grace ran out) or "gone" (it had already exited)


def stop_pid(pid: int, started: int | None, grace: float, popen: subprocess.Popen[bytes] | None = None,
             kill: bool = False) -> tuple[float, str]:
    """SIGTERM (SIGKILL if `kill`), wait up to `grace` seconds, then SIGKILL. A child of ours (`popen`) is reaped."""
    t0 = time.monotonic()
    if popen is not None:
        if popen.poll() is not None:
            return 0.0, "gone"
        popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            popen.wait(timeout=grace)
            return time.monotonic() - t0, "SIGKILL" if kill else "SIGTERM"
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
            return time.monotonic() - t0, "SIGKILL"
    if not _alive(pid, started):
        return 0.0, "gone"
    try:
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return 0.0, "gone"
    deadline = t0 + grace
    while _alive(pid, started):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            while _alive(pid, started):
                time.sleep(0.01)
            return time.monotonic() - t0, "SIGKILL"
        time.sleep(0.01)
    return time.monotonic() - t0, "SIGKILL" if kill else "SIGTERM"


class ProcessTable:
    """`<run_dir>/<name>.pid` for each process a local federation started."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def _file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def record(self, name: str, pid: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._file(name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "started": start_time(pid)}))
        os.replace(tmp, self._file(name))

    def forget(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    def get(self, name: str) -> Recorded | None:
        try:
            data = json.loads(self._file(name).read_text())
            return Recorded(name, int(data["pid"]), None if data.get("started") is None else int(data["started"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def recorded(self) -> list[Recorded]:
        if not self.run_dir.is_dir():
            return []
        found = (self.get(p.stem) for p in sorted(self.run_dir.glob("*.pid")))
        return [r for r in found if r is not None]

    def running(self) -> list[Recorded]:
        return [r for r in self.recorded() if r.alive]

    def stop(self, name: str, grace: float, popen: subprocess.Popen[bytes] | None = None,
             kill: bool = False) -> Stopped | None:
        """Stop the process recorded as `name` (or the child `popen`) and forget it; None if none was recorded."""
        rec = self.get(name)
        if rec is None and popen is None:
            return None
        pid = popen.pid if popen is not None else rec.pid  # type: ignore[union-attr]
        started = rec.started if rec is not None and rec.pid == pid else None
        seconds, how = stop_pid(pid, started, grace, popen, kill)
        self.forget(name)
        return Stopped(name, pid, seconds, how)
