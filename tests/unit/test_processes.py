"""Pid files of a local federation's background processes: found again, stopped, never mistaken for another."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from fedsilo.processes import ProcessTable, start_time

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"]


def test_record_find_and_stop(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "run")
    proc = subprocess.Popen(SLEEPER)
    table.record("sleeper", proc.pid)
    [rec] = table.running()
    assert (rec.name, rec.pid, rec.started) == ("sleeper", proc.pid, start_time(proc.pid))
    stopped = table.stop("sleeper", grace=5, popen=proc)
    assert stopped is not None and stopped.how == "SIGTERM" and proc.returncode == -signal.SIGTERM
    assert table.recorded() == [] and table.stop("sleeper", grace=1) is None


def test_a_process_not_ours_is_stopped_by_pid_and_killed_after_the_grace(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "run")
    proc = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    table.record("stubborn", proc.pid)
    stopped = table.stop("stubborn", grace=0.3)  # as `fedsilo local down` does: by pid, not as its parent
    assert stopped is not None and stopped.how == "SIGKILL" and stopped.seconds >= 0.3
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_a_reused_pid_is_never_taken_for_ours(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "run")
    proc = subprocess.Popen(SLEEPER)
    try:
        (tmp_path / "run").mkdir()
        started = start_time(proc.pid)
        assert started is not None
        (tmp_path / "run" / "old.pid").write_text(f'{{"pid": {proc.pid}, "started": {started - 1}}}')
        assert table.running() == []  # same pid, another start time: another process
        stopped = table.stop("old", grace=1)
        assert stopped is not None and stopped.how == "gone" and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
