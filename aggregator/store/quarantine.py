"""Rows that fail `checks` are moved aside, never left to stop the aggregator.

`quarantine_job` looks at every row of a running job before a replica resumes it (at start-up, or taking it over
from another replica), `quarantine_sites` at every site row at start-up. A row that fails its check is copied to the
`quarantine` table, with its table, key and reason, and deleted where it was; the job it belongs to is failed with
the reason (its report is then written from what is left). A job whose own row cannot be read is failed without a
follow-up: there is no report to write from it. Each call is one transaction. The console lists the quarantine
(`GET /api/v1/quarantine`).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aggregator.store import checks
from aggregator.store.leases import Fence
from aggregator.store.sqlaccess import SqlAccess

Row = dict[str, Any]
# (table, primary-key columns, check) of the rows a running job owns.
JOB_TABLES: tuple[tuple[str, tuple[str, ...], Callable[[Row], str | None]], ...] = (
    ("job_sites", ("job_id", "site"), checks.decision),
    ("rounds", ("job_id", "round"), checks.round_),
    ("updates", ("job_id", "round", "site"), checks.update),
    ("evaluations", ("job_id", "version", "site"), checks.evaluation),
)


@dataclass(frozen=True)
class Quarantined:
    table: str
    job_id: str | None
    key: str
    reason: str


class QuarantineQueries(SqlAccess):
    @abstractmethod
    def _fence(self, fence: Fence | None) -> None: ...

    def quarantine_job(self, job_id: str, now: float, fence: Fence | None = None) -> list[Quarantined]:
        """Move aside every row of the running job `job_id` that fails its check, failing the job with the
        reasons; done by the replica about to resume the job, holding its lease (`fence`)."""
        out: list[Quarantined] = []
        with self._tx():
            self._fence(fence)
            rows = self._query("SELECT * FROM jobs WHERE job_id=? AND state IN ('offered', 'running')", (job_id,))
            if not rows:
                return out
            job = rows[0]
            bad = checks.job(job)
            if bad is not None:
                self._move(out, "jobs", job, ("job_id",), bad, now, delete=False)
                self._execute("UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE job_id=?",
                              (f"its stored state could not be read: {bad}"[:1000], now, job_id))
                return out
            reasons = []
            for table, key, check in JOB_TABLES:
                for row in self._query(f"SELECT * FROM {table} WHERE job_id=?", (job_id,)):
                    bad = check(row)
                    if bad is not None:
                        self._move(out, table, row, key, bad, now)
                        reasons.append(f"{table} {out[-1].key}: {bad}")
            if reasons:
                reason = f"stored rows failed their checks and were quarantined: {'; '.join(reasons)}"[:1000]
                self._execute("UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE job_id=?",
                              (reason, now, job_id))
                self._execute("INSERT INTO followups VALUES (?,?,?) ON CONFLICT DO NOTHING", (job_id, "failed", now))
        return out

    def quarantine_sites(self, now: float) -> list[Quarantined]:
        """Move aside every site row that fails its check (sites belong to no job: any replica may)."""
        out: list[Quarantined] = []
        with self._tx():
            for row in self._query("SELECT * FROM sites"):
                bad = checks.site(row)
                if bad is not None:
                    self._move(out, "sites", row, ("site",), bad, now)
        return out

    def _move(self, out: list[Quarantined], table: str, row: Row, key: tuple[str, ...], reason: str, now: float,
              delete: bool = True) -> None:
        key_text = "/".join(str(row[k]) for k in key)
        self._execute("INSERT INTO quarantine (tbl, job_id, row_key, reason, row_json, at) VALUES (?,?,?,?,?,?)",
                      (table, row.get("job_id"), key_text, reason, json.dumps(row, default=str), now))
        if delete:
            where = " AND ".join(f"{k}=?" for k in key)
            self._execute(f"DELETE FROM {table} WHERE {where}", tuple(row[k] for k in key))
        out.append(Quarantined(table, row.get("job_id"), key_text, reason))

    def quarantined(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The rows moved aside, newest first (without the row itself, which may hold anything)."""
        return self._query("SELECT id, tbl AS table_name, job_id, row_key, reason, at FROM quarantine "
                           "ORDER BY id DESC LIMIT ?", (limit,))
