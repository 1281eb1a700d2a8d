"""The default store: one SQLite file, WAL journal, fsync on every commit."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aggregator.store.sql import SCHEMA, Row, SqlStore


class SQLiteStore(SqlStore):
    """The default: one file, WAL journal, fsync on every commit (`synchronous=FULL`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA.format(serial="INTEGER"))  # INTEGER PRIMARY KEY is SQLite's rowid

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def db_now(self) -> float:
        return time.time()  # one process, one clock

    def close(self) -> None:
        self._db.close()
