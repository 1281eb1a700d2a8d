"""Durable job, round and update state behind one interface.

`StateStore` (`base.py`) is what the round engine talks to; `SQLiteStore` (WAL, synchronous=FULL) is the default
and `PostgresStore` serves production; both share every query (`SqlStore`) and one test suite
(`tests/unit/test_store.py`).
"""

from __future__ import annotations

from pathlib import Path

from aggregator.store.base import JobRow, RoundRow, SiteDecision, StateStore, UpdateRow

__all__ = ["JobRow", "RoundRow", "SiteDecision", "StateStore", "UpdateRow", "open_store", "sqlite_path"]


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///relative.db` or `sqlite:////absolute.db` URL (as SQLAlchemy reads
    them); None for any other URL."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_store(url: str) -> StateStore:
    """Pick an implementation from a URL: `sqlite:///relative.db`, `sqlite:////absolute.db` or `postgresql://...`."""
    path = sqlite_path(url)
    if path is not None:
        from aggregator.store.sqlite import SQLiteStore

        return SQLiteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        from aggregator.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported state store URL {url!r}; expected sqlite:///PATH or postgresql://...")
