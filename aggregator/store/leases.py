"""One writer per job across aggregator replicas: a lease row per running job, with a fencing token.

A replica writes a job's state only while it holds the job's lease; every such write first checks, inside its own
transaction, that the lease row still names this replica with the token it was given (`_fence`), so a replica that
lost its lease (paused past the expiry, cut off from the database) has its late commit refused, never silently
applied. Taking a lease increments the token, so even the same replica after a restart fences its former self.
Expiry is measured on the database's clock (PostgreSQL's `clock_timestamp()`), never a replica's: replicas' clocks
may disagree, the database is the one clock every replica's writes go through. With SQLite there is one process and
one clock.

Advisory locks were the alternative; a lease row was chosen because it survives the holder's connection (a
reconnect does not hand the job to another replica mid-round), carries the holder's address (where other replicas
forward a job's requests, `aggregator.forward`) and gives the token every write checks.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from aggregator.store.sqlaccess import SqlAccess

Row = dict[str, Any]


@dataclass(frozen=True)
class Fence:
    """What a job's writes must prove: this replica holds the job's lease with this token."""

    job_id: str
    holder: str
    token: int


class FencedOut(RuntimeError):
    """The job's lease is held by another replica (or was taken again since): this write must not happen."""

    def __init__(self, job_id: str, detail: str) -> None:
        super().__init__(f"job {job_id}: {detail}")
        self.job_id = job_id


@dataclass(frozen=True)
class Lease:
    job_id: str
    holder: str
    address: str
    token: int
    expires_at: float


class LeaseQueries(SqlAccess):
    _lock_suffix = ""  # " FOR UPDATE" where the database locks rows read in a transaction (PostgreSQL)

    @abstractmethod
    def db_now(self) -> float:
        """The database's clock (Unix seconds): the one every replica's lease expiry is measured on."""

    def acquire_lease(self, job_id: str, holder: str, address: str, ttl_s: float) -> int | None:
        """Take the job's lease if it is free, expired, or already this holder's; returns the new fencing token,
        or None when another replica holds it."""
        with self._tx():
            now = self.db_now()
            rows = self._query(f"SELECT holder, token, expires_at FROM leases WHERE job_id=?{self._lock_suffix}",
                               (job_id,))
            if not rows:
                added = self._execute("INSERT INTO leases VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                                      (job_id, holder, address, 1, now + ttl_s))
                return 1 if added else None
            row = rows[0]
            if row["holder"] != holder and row["expires_at"] >= now:
                return None
            token = int(row["token"]) + 1
            self._execute("UPDATE leases SET holder=?, address=?, token=?, expires_at=? WHERE job_id=?",
                          (holder, address, token, now + ttl_s, job_id))
            return token

    def renew_leases(self, fences: list[Fence], ttl_s: float) -> set[str]:
        """Extend each lease still held with its token; returns the jobs whose lease was (the others are lost)."""
        held = set()
        with self._tx():
            expires = self.db_now() + ttl_s
            for f in fences:
                if self._execute("UPDATE leases SET expires_at=? WHERE job_id=? AND holder=? AND token=?",
                                 (expires, f.job_id, f.holder, f.token)):
                    held.add(f.job_id)
        return held

    def release_lease(self, fence: Fence) -> None:
        with self._tx():
            self._execute("DELETE FROM leases WHERE job_id=? AND holder=? AND token=?",
                          (fence.job_id, fence.holder, fence.token))

    def hand_over_lease(self, fence: Fence) -> None:
        """Let the lease expire now (a replica shutting down): another replica takes the job at its next look
        instead of after the TTL. The row and its token stay, so the next token is still larger."""
        with self._tx():
            self._execute("UPDATE leases SET expires_at=0 WHERE job_id=? AND holder=? AND token=?",
                          (fence.job_id, fence.holder, fence.token))

    def lease(self, job_id: str) -> Lease | None:
        rows = self._query("SELECT * FROM leases WHERE job_id=?", (job_id,))
        return Lease(**rows[0]) if rows else None

    def takeable_jobs(self, holder: str) -> list[str]:
        """Running or offered jobs `holder` may take: their lease is missing, expired, or its own (a restart)."""
        now = self.db_now()
        rows = self._query(
            "SELECT j.job_id FROM jobs j LEFT JOIN leases l ON l.job_id=j.job_id "
            "WHERE j.state IN ('offered', 'running') AND (l.job_id IS NULL OR l.expires_at < ? OR l.holder = ?) "
            "ORDER BY j.created_at", (now, holder))
        return [r["job_id"] for r in rows]

    def _fence(self, fence: Fence | None) -> None:
        """Inside a write's transaction: refuse it unless `fence` still holds the job's lease. The row is locked
        (PostgreSQL) or the database is (SQLite's BEGIN IMMEDIATE), so a takeover cannot commit in between."""
        if fence is None:
            return
        rows = self._query(f"SELECT holder, token FROM leases WHERE job_id=?{self._lock_suffix}", (fence.job_id,))
        if not rows or rows[0]["holder"] != fence.holder or int(rows[0]["token"]) != fence.token:
            now = f"{rows[0]['holder']} holds token {rows[0]['token']}" if rows else "no lease"
            raise FencedOut(fence.job_id, f"lease token {fence.token} of {fence.holder} is no longer current ({now})")
