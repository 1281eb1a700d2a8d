"""The agent's durable state (SQLite, WAL, synchronous=FULL): job decisions, the release log, and what secure
aggregation must remember across a restart (the split each round's reveal was for, the rounds it shared in).

The release log is the privacy ledger: a round's exact privatized bytes and the ε it spends *in each unit* its
mechanisms protect (`spend`: per patient record, per site, or both) are written in one transaction before
anything is sent. After a crash the agent resends those same bytes instead of training again, so a round is
never released (nor charged) twice. Budgets are kept per unit: a job is charged in the units its mechanisms
protect, and must fit in each of those ledgers.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from federation.faults import failpoint

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
-- The ledger proper: ε per unit per released round (cumulative over the job's rounds so far).
CREATE TABLE IF NOT EXISTS spend (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, dataset TEXT NOT NULL, unit TEXT NOT NULL, epsilon REAL NOT NULL,
  at REAL NOT NULL, PRIMARY KEY (job_id, round, unit));
CREATE INDEX IF NOT EXISTS spend_ledger ON spend (dataset, unit, at, job_id, epsilon);
-- What an accepted job may spend in each unit over all its rounds (its plan), reserved against the budgets.
CREATE TABLE IF NOT EXISTS plans (job_id TEXT NOT NULL, unit TEXT NOT NULL, epsilon REAL NOT NULL,
  PRIMARY KEY (job_id, unit));
-- Secure aggregation: the one split of a round's roster into survivors and dropped sites this site revealed shares
-- for (never a second: two splits could hand over both kinds of share of one site), and the rounds it posted its
-- shares in (a restart before uploading makes it a dropout of that round: its mask secrets are gone).
CREATE TABLE IF NOT EXISTS reveals (job_id TEXT NOT NULL, round INTEGER NOT NULL, survivors TEXT NOT NULL,
  dropped TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS shared (job_id TEXT NOT NULL, round INTEGER NOT NULL, mask_key TEXT NOT NULL,
  at REAL NOT NULL, PRIMARY KEY (job_id, round));
"""
# A state database written before the ledger was kept per unit has one ε per release and per plan, in the unit
# the job declared: copy those into `spend` and `plans` once (idempotent), so no spend is forgotten on upgrade.
_MIGRATE = """
INSERT OR IGNORE INTO spend SELECT r.job_id, r.round, r.dataset,
  COALESCE(json_extract(j.spec, '$.privacy.unit'), 'site'), r.epsilon, r.at
  FROM releases r LEFT JOIN jobs j ON j.job_id = r.job_id
  WHERE NOT EXISTS (SELECT 1 FROM spend s WHERE s.job_id = r.job_id AND s.round = r.round);
INSERT OR IGNORE INTO plans SELECT j.job_id, COALESCE(json_extract(j.spec, '$.privacy.unit'), 'site'),
  j.epsilon_planned FROM jobs j
  WHERE j.decision = 'accepted' AND NOT EXISTS (SELECT 1 FROM plans p WHERE p.job_id = j.job_id);
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
        self._db.executescript(f"BEGIN; {_MIGRATE} COMMIT;")

    def record_decision(
        self, job_id: str, spec_json: str, decision: str, reasons: list[str], dataset: str = "",
        planned: dict[str, float] | None = None,
    ) -> None:
        """Record the decision and, for an accepted job, the ε it may spend in each unit (its plan)."""
        planned = planned or {}
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (job_id, spec, decision, reasons, at, dataset, epsilon_planned)"
                " VALUES (?,?,?,?,?,?,?)",
                (job_id, spec_json, decision, json.dumps(reasons), time.time(), dataset,
                 max(planned.values(), default=0.0)),
            )
            self._db.execute("DELETE FROM plans WHERE job_id=?", (job_id,))
            if decision == "accepted":
                self._db.executemany("INSERT INTO plans VALUES (?,?,?)",
                                     [(job_id, unit, eps) for unit, eps in planned.items()])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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

    def spent(self, dataset: str, unit: str, since: float = 0.0, exclude_job: str | None = None) -> float:
        """ε spent on `dataset` in `unit`: each job's cumulative ε (basic composition across jobs), counting every
        job that released anything since `since` in full (conservative across a budget reset)."""
        rows = self._db.execute(
            "SELECT job_id, MAX(epsilon) FROM spend WHERE dataset=? AND unit=? AND job_id IN "
            "(SELECT job_id FROM spend WHERE dataset=? AND unit=? AND at>=?) GROUP BY job_id",
            (dataset, unit, dataset, unit, since),
        ).fetchall()
        return float(sum(eps for job, eps in rows if job != exclude_job))

    def committed(self, dataset: str, unit: str, since: float = 0.0) -> float:
        """ε spent on `dataset` in `unit` plus what running jobs may still spend in it (their plan): what a new
        job must fit beside, so that concurrent jobs can never jointly overrun the budget."""
        total = self.spent(dataset, unit, since)
        for job_id, planned in self._db.execute(
            "SELECT p.job_id, p.epsilon FROM plans p JOIN jobs j ON j.job_id = p.job_id"
            " WHERE j.decision='accepted' AND j.closed=0 AND j.dataset=? AND p.unit=?",
            (dataset, unit),
        ).fetchall():
            row = self._db.execute("SELECT MAX(epsilon) FROM spend WHERE job_id=? AND unit=?",
                                   (job_id, unit)).fetchone()
            released = float(row[0]) if row and row[0] is not None else 0.0
            total += max(float(planned) - released, 0.0)
        return total

    def record_release(self, r: Release, spend: dict[str, float]) -> None:
        """Durably log a round's released bytes and its ε in each unit, in one transaction; raises if the round
        was already released."""
        at = time.time()
        with self._transaction():
            self._db.execute(
                "INSERT INTO releases VALUES (?,?,?,?,?,?,?,?,?)",
                (r.job_id, r.round, r.dataset, r.noise_multiplier, r.epsilon, r.payload, r.envelope, 0, at),
            )
            failpoint("ledger_between_release_and_spend")
            self._db.executemany("INSERT INTO spend VALUES (?,?,?,?,?,?)",
                                 [(r.job_id, r.round, r.dataset, unit, eps, at) for unit, eps in spend.items()])

    def job_spend(self, job_id: str) -> dict[str, float]:
        """ε this job has spent so far, per unit."""
        return {str(u): float(e) for u, e in self._db.execute(
            "SELECT unit, MAX(epsilon) FROM spend WHERE job_id=? GROUP BY unit", (job_id,)).fetchall()}

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

    def record_reveal(self, job_id: str, rnd: int, survivors: list[str], dropped: list[str]) -> None:
        """Durably record the split this site reveals for (before the reveal is sent). Recording the same split again
        is a no-op; another split for the round raises ValueError (the caller has refused it already)."""
        split = (json.dumps(sorted(survivors)), json.dumps(sorted(dropped)))
        with self._transaction():
            row = self._db.execute("SELECT survivors, dropped FROM reveals WHERE job_id=? AND round=?",
                                   (job_id, rnd)).fetchone()
            if row is not None:
                if (row[0], row[1]) != split:
                    raise ValueError(f"round {rnd} of job {job_id} already revealed for another split")
                return
            self._db.execute("INSERT INTO reveals VALUES (?,?,?,?,?)", (job_id, rnd, *split, time.time()))

    def reveal_of(self, job_id: str, rnd: int) -> tuple[list[str], list[str]] | None:
        """The (survivors, dropped) split this site revealed for in that round, if any."""
        row = self._db.execute("SELECT survivors, dropped FROM reveals WHERE job_id=? AND round=?",
                               (job_id, rnd)).fetchone()
        return (list(json.loads(row[0])), list(json.loads(row[1]))) if row else None

    def record_shared(self, job_id: str, rnd: int, mask_key: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO shared VALUES (?,?,?,?)", (job_id, rnd, mask_key, time.time()))

    def shared(self, job_id: str, rnd: int) -> str | None:
        """The mask key this site posted shares of in that round, if it did."""
        row = self._db.execute("SELECT mask_key FROM shared WHERE job_id=? AND round=?", (job_id, rnd)).fetchone()
        return str(row[0]) if row else None

    def close(self) -> None:
        self._db.close()
