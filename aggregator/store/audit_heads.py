"""The latest audit-chain head each site reported (`federation.messages.AuditHeadCarrier`), kept here, outside the
hospital's control.

A site's agent keeps a hash-chained audit log that its own administrator could rewrite and re-chain; the heads
recorded here let `fedsilo audit verify --aggregator-head` show that the local chain no longer contains what the
agent reported. A head only moves forward: a report with fewer entries than recorded changes nothing, and one with
as many entries but another hash is counted as a conflict (the first one is kept): the same entry cannot have two
hashes unless the chain was rewritten.
"""

from __future__ import annotations

from typing import Any

from aggregator.store.sqlaccess import SqlAccess

Row = dict[str, Any]


_SELECT = "SELECT site, seq, sha256, at, conflicts FROM audit_heads"


class AuditHeadQueries(SqlAccess):
    def record_audit_heads(self, rows: list[tuple[str, int, str, float, int]]) -> None:
        """(site, seq, sha256, at, new conflicts) of each site, in one transaction; see the module docstring."""
        newer = "CASE WHEN excluded.seq > audit_heads.seq THEN excluded.{0} ELSE audit_heads.{0} END"
        with self._tx():
            for site, seq, sha, at, conflicts in rows:
                self._execute(
                    "INSERT INTO audit_heads VALUES (?,?,?,?,?) ON CONFLICT (site) DO UPDATE SET "
                    f"sha256 = {newer.format('sha256')}, at = {newer.format('at')}, seq = {newer.format('seq')}, "
                    "conflicts = audit_heads.conflicts + excluded.conflicts",
                    (site, seq, sha, at, conflicts))

    def audit_heads(self) -> list[Row]:
        return [_typed(r) for r in self._query(f"{_SELECT} ORDER BY site")]

    def audit_head(self, site: str) -> Row | None:
        rows = self._query(f"{_SELECT} WHERE site=?", (site,))
        return _typed(rows[0]) if rows else None


def _typed(row: Row) -> Row:
    return {**row, "seq": int(row["seq"]), "conflicts": int(row["conflicts"])}
