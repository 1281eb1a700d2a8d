"""The secure-aggregation protocol's durable messages (`aggregator.secagg`): each site's per-job share key, each
round's share bundles and reveals, and the roster and unmask request the aggregator froze for the round.

Each is written before it is acknowledged or announced, once (a closed round's bundles and reveals are then
dropped): a repeat (a site's retry, a restarted aggregator
re-freezing) finds the first row and changes nothing, so what the sites were told never changes under them.
"""

from __future__ import annotations

from aggregator.store.leases import Fence
from aggregator.store.sqlaccess import SqlAccess

# A row's `site` for what the aggregator itself froze for a round (roster, unmask request).
AGGREGATOR = ""
KINDS = ("key", "shares", "roster", "unmask", "reveal")


class SecAggQueries(SqlAccess):
    def _fence(self, fence: Fence | None) -> None: ...

    def put_secagg(self, job_id: str, rnd: int, site: str, kind: str, body: str, at: float,
                   fence: Fence | None = None) -> str:
        """Store `body` unless a row for (job, round, site, kind) exists; return the row's body either way."""
        if kind not in KINDS:
            raise ValueError(f"unknown secure-aggregation row kind {kind!r}")
        with self._tx():
            self._fence(fence)
            self._execute("INSERT INTO secagg VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                          (job_id, rnd, site, kind, body, at))
            rows = self._query("SELECT body FROM secagg WHERE job_id=? AND round=? AND site=? AND kind=?",
                               (job_id, rnd, site, kind))
        return str(rows[0]["body"])

    def drop_secagg_round(self, job_id: str, rnd: int, fence: Fence | None = None) -> None:
        """Delete a closed round's share bundles and reveals (n² sealed shares: useless once the sum is out); the
        signed roster and unmask request stay, the record of what each site was told."""
        with self._tx():
            self._fence(fence)
            self._execute("DELETE FROM secagg WHERE job_id=? AND round=? AND kind IN ('shares', 'reveal')",
                          (job_id, rnd))

    def secagg_rows(self, job_id: str, rnd: int, kind: str) -> dict[str, str]:
        """site → body of every row of `kind` in the round (round 0: the job's share keys)."""
        rows = self._query("SELECT site, body FROM secagg WHERE job_id=? AND round=? AND kind=? ORDER BY site",
                           (job_id, rnd, kind))
        return {str(r["site"]): str(r["body"]) for r in rows}
