"""What the query mixins of the SQL store (`leases`, `quarantine`, `audit_heads`) need of it: statements, queries
and transactions, the same on SQLite and PostgreSQL (`aggregator.store.sql.SqlStore` provides them)."""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any

Row = dict[str, Any]


class SqlAccess:
    @abstractmethod
    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int: ...

    @abstractmethod
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]: ...

    @abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager[None]: ...
