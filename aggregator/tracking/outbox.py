"""The durable buffer between training and the sinks: a SQLite outbox, one row per record per sink.

Enqueueing is a local commit (never a network call), so training never waits on a tracker; a record stays
until its sink took it, across failures and restarts. `(sink, key)` is unique, so replaying a summary
queues nothing twice. Used from one thread (the hub's outbox thread).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from aggregator.tracking.sink import Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  sink TEXT NOT NULL,
  key TEXT NOT NULL,
  job_id TEXT NOT NULL,
  record TEXT NOT NULL,
  created_at REAL NOT NULL,
  delivered_at REAL,
  UNIQUE (sink, job_id, key)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (sink, delivered_at, id);
"""


class Outbox:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def enqueue(self, sink: str, records: list[Record]) -> int:
        """Queue the records not queued before; returns how many were new."""
        now = time.time()
        with self._db:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox (sink, key, job_id, record, created_at) VALUES (?, ?, ?, ?, ?)",
                [(sink, r.key, r.run.job_id, r.model_dump_json(), now) for r in records],
            )
            return self._db.total_changes - before

    def pending(self, sink: str, limit: int) -> list[tuple[int, Record]]:
        rows = self._db.execute(
            "SELECT id, record FROM outbox WHERE sink = ? AND delivered_at IS NULL ORDER BY id LIMIT ?",
            (sink, limit),
        ).fetchall()
        return [(int(i), Record.model_validate_json(text)) for i, text in rows]

    def count_pending(self, sink: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE sink = ? AND delivered_at IS NULL", (sink,)
        ).fetchone()
        return int(row[0])

    def mark_delivered(self, ids: list[int]) -> None:
        with self._db:
            self._db.executemany("UPDATE outbox SET delivered_at = ? WHERE id = ?", [(time.time(), i) for i in ids])

    def prune(self, older_than_s: float) -> int:
        """Forget records delivered long ago (their keys only guard against re-queueing a running job's past)."""
        with self._db:
            cur = self._db.execute("DELETE FROM outbox WHERE delivered_at < ?", (time.time() - older_than_s,))
            return cur.rowcount

    def close(self) -> None:
        self._db.close()
