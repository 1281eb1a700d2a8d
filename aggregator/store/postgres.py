"""The production store: PostgreSQL (e.g. RDS), through psycopg 3."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from aggregator.store.sql import SCHEMA, Row, SqlStore


class PostgresStore(SqlStore):
    """For production (e.g. RDS): `postgresql://user:password@host:port/dbname`. Several aggregator replicas may
    share one database: leases lock their rows (`FOR UPDATE`) and expire on the database's clock."""

    _lock_suffix = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self._db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        with self._db.transaction():
            # Replicas starting together would race on CREATE TABLE IF NOT EXISTS: one at a time.
            self._db.execute("SELECT pg_advisory_xact_lock(7254031)")
            self._db.execute(SCHEMA.format(serial="BIGSERIAL"))
            # Sample counts were 32-bit columns before: a round's sum over many sites must fit.
            for table, column in (("rounds", "n_samples"), ("updates", "num_samples"), ("evaluations", "n")):
                kind = self._db.execute(
                    "SELECT data_type FROM information_schema.columns WHERE table_name=%s AND column_name=%s",
                    (table, column)).fetchone()
                if kind is not None and kind["data_type"] == "integer":
                    self._db.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT")

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self._db.execute(self._sql(sql), params).rowcount

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return list(self._db.execute(self._sql(sql), params).fetchall())

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        with self._db.transaction():
            yield

    def db_now(self) -> float:
        row = self._db.execute("SELECT extract(epoch from clock_timestamp())::float8 AS t").fetchone()
        assert row is not None
        return float(row["t"])

    def close(self) -> None:
        self._db.close()
