"""The agent's durable state (SQLite, WAL, synchronous=FULL): job decisions and the release log.

The release log is the privacy ledger: a row holds the ε spent by one round *and* the exact privatized
bytes released for it, written in one transaction before anything is sent. After a crash the agent resends
those same bytes instead of training again, so a round is never released (nor charged) twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL,
  closed INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL, dataset TEXT NOT NULL DEFAULT '',
  epsilon_planned REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS seen (
  job_id TEXT NOT NULL, channel TEXT NOT NULL, issued_at REAL NOT NULL, nonce TEXT NOT NULL,
  PRIMARY KEY (job_id, channel));
CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, dataset TEXT NOT NULL, noise_multiplier REAL NOT NULL,
  epsilon REAL NOT NULL, payload BLOB NOT NULL, envelope TEXT NOT NULL, sent INTEGER NOT NULL DEFAULT 0,
  at REAL NOT NULL, PRIMARY KEY (job_id, round));
-- Covering index for the ledger queries: without it every budget check walks each release's payload pages.
CREATE INDEX IF NOT EXISTS releases_ledger ON releases (dataset, at, job_id, epsilon);
"""


@dataclass(frozen=True)
class Release:
    job_id: str
    round: int
    dataset: str
    noise_multiplier: float
    epsilon: float
    payload: bytes
    envelope: str
    sent: bool


class AgentState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def record_decision(
        self, job_id: str, spec_json: str, decision: str, reasons: list[str], dataset: str = "",
        epsilon_planned: float = 0.0,
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO jobs (job_id, spec, decision, reasons, at, dataset, epsilon_planned)"
            " VALUES (?,?,?,?,?,?,?)",
            (job_id, spec_json, decision, json.dumps(reasons), time.time(), dataset, epsilon_planned),
        )

    def decision(self, job_id: str) -> tuple[str, list[str], bool] | None:
        row = self._db.execute("SELECT decision, reasons, closed FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return (row[0], json.loads(row[1]), bool(row[2])) if row else None

    def spec_json(self, job_id: str) -> str | None:
        row = self._db.execute("SELECT spec FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return str(row[0]) if row else None

    def close_job(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET closed=1 WHERE job_id=?", (job_id,))

    def active_jobs(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT job_id FROM jobs WHERE decision='accepted' AND closed=0")]

    def last_seen(self, job_id: str, channel: str) -> tuple[float, str] | None:
        row = self._db.execute(
            "SELECT issued_at, nonce FROM seen WHERE job_id=? AND channel=?", (job_id, channel)
        ).fetchone()
        return (float(row[0]), str(row[1])) if row else None

    def mark_seen(self, job_id: str, channel: str, issued_at: float, nonce: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO seen VALUES (?,?,?,?)", (job_id, channel, issued_at, nonce))

    def set_audit_head(self, seq: int, digest: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO audit_head VALUES (1, ?, ?)", (seq, digest))

    def audit_head(self) -> tuple[int, str] | None:
        row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id=1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def spent(self, dataset: str, since: float = 0.0, exclude_job: str | None = None) -> float:
        """ε spent on `dataset`: each job's cumulative ε (basic composition across jobs), counting every job
        that released anything since `since` in full (conservative across a budget reset)."""
        rows = self._db.execute(
            "SELECT job_id, MAX(epsilon) FROM releases WHERE dataset=? AND job_id IN "
            "(SELECT job_id FROM releases WHERE dataset=? AND at>=?) GROUP BY job_id",
            (dataset, dataset, since),
        ).fetchall()
        return float(sum(eps for job, eps in rows if job != exclude_job))

    def committed(self, dataset: str, since: float = 0.0) -> float:
        """ε spent on `dataset` plus what running jobs on it may still spend (their plan): what a new job
        must fit beside, so that concurrent jobs can never jointly overrun the budget."""
        total = self.spent(dataset, since)
        for job_id, planned in self._db.execute(
            "SELECT job_id, epsilon_planned FROM jobs WHERE decision='accepted' AND closed=0 AND dataset=?",
            (dataset,),
        ).fetchall():
            row = self._db.execute("SELECT MAX(epsilon) FROM releases WHERE job_id=?", (job_id,)).fetchone()
            released = float(row[0]) if row and row[0] is not None else 0.0
            total += max(float(planned) - released, 0.0)
        return total

    def record_release(self, r: Release) -> None:
        """Durably log a round's spend and released bytes; raises if the round was already released."""
        self._db.execute(
            "INSERT INTO releases VALUES (?,?,?,?,?,?,?,?,?)",
            (r.job_id, r.round, r.dataset, r.noise_multiplier, r.epsilon, r.payload, r.envelope, 0, time.time()),
        )

    def release(self, job_id: str, rnd: int) -> Release | None:
        row = self._db.execute(
            "SELECT job_id, round, dataset, noise_multiplier, epsilon, payload, envelope, sent FROM releases"
            " WHERE job_id=? AND round=?",
            (job_id, rnd),
        ).fetchone()
        if row is None:
            return None
        return Release(row[0], row[1], row[2], row[3], row[4], row[5], row[6], sent=bool(row[7]))

    def mark_sent(self, job_id: str, rnd: int) -> None:
        self._db.execute("UPDATE releases SET sent=1 WHERE job_id=? AND round=?", (job_id, rnd))

    def releases_for(self, job_id: str) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM releases WHERE job_id=?", (job_id,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._db.close()
