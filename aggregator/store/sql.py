"""Every query of the store, written once in portable SQL: SQLite (≥ 3.24) and PostgreSQL both speak
`ON CONFLICT`. Subclasses supply the connection, transactions and the placeholder style."""

from __future__ import annotations

import contextlib
import json
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import structlog

from aggregator.store import checks
from aggregator.store.audit_heads import AuditHeadQueries
from aggregator.store.base import JobRow, RoundRow, SiteDecision, StateStore, UpdateRow
from aggregator.store.leases import Fence, LeaseQueries
from aggregator.store.quarantine import QuarantineQueries
from aggregator.store.secagg import SecAggQueries
from federation.jobs import JobSpec
from federation.messages import EvalMetrics

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, round INTEGER NOT NULL,
  model_sha TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', created_at DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL, requester TEXT NOT NULL DEFAULT '', paused INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS job_sites (
  job_id TEXT NOT NULL, site TEXT NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL,
  epsilon_planned DOUBLE PRECISION, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, site));
CREATE TABLE IF NOT EXISTS rounds (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
  started_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION NOT NULL, closed_at DOUBLE PRECISION,
  model_in TEXT NOT NULL, model_out TEXT, n_sites INTEGER NOT NULL DEFAULT 0, n_samples BIGINT NOT NULL DEFAULT 0,
  train_loss DOUBLE PRECISION, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS updates (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, sha256 TEXT NOT NULL,
  num_samples BIGINT NOT NULL, train_loss DOUBLE PRECISION NOT NULL, epsilon DOUBLE PRECISION,
  received_at DOUBLE PRECISION NOT NULL, share_tracking INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY (job_id, round, site));
CREATE TABLE IF NOT EXISTS evaluations (
  job_id TEXT NOT NULL, version INTEGER NOT NULL, site TEXT NOT NULL, n BIGINT NOT NULL, loss DOUBLE PRECISION,
  auc DOUBLE PRECISION, PRIMARY KEY (job_id, version, site));
CREATE TABLE IF NOT EXISTS rejections (
  id {serial} PRIMARY KEY, job_id TEXT, round INTEGER, site TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL,
  at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS update_privacy (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, unit TEXT NOT NULL, epsilon DOUBLE PRECISION,
  PRIMARY KEY (job_id, round, site, unit));
CREATE TABLE IF NOT EXISTS models (sha TEXT PRIMARY KEY, job_id TEXT NOT NULL, version INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS updates_by_site ON updates (job_id, site, round);
CREATE TABLE IF NOT EXISTS followups (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
  site TEXT PRIMARY KEY, state TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
  job_id TEXT PRIMARY KEY, holder TEXT NOT NULL, address TEXT NOT NULL, token BIGINT NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS audit_heads (
  site TEXT PRIMARY KEY, seq BIGINT NOT NULL, sha256 TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
  conflicts BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS secagg (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
  at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, round, kind, site));
CREATE TABLE IF NOT EXISTS quarantine (
  id {serial} PRIMARY KEY, tbl TEXT NOT NULL, job_id TEXT, row_key TEXT NOT NULL, reason TEXT NOT NULL,
  row_json TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
"""
log = structlog.get_logger(__name__)
ENDED = ("finished", "failed", "cancelled")
_JOB_COLUMNS = "job_id, spec, state, round, model_sha, reason, created_at, updated_at, requester, paused"
Row = dict[str, Any]


class SqlStore(LeaseQueries, QuarantineQueries, AuditHeadQueries, SecAggQueries, StateStore):
    """The store in portable SQL (SQLite ≥ 3.24 and PostgreSQL both speak `ON CONFLICT`). Subclasses supply
    the connection, transactions and the placeholder style; every query is written once, here."""

    @abstractmethod
    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run a statement; return the number of rows it changed."""

    @abstractmethod
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]: ...

    @abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager[None]:
        """One transaction: committed on success, rolled back on any exception."""

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    # jobs
    def create_job(
        self, job_id: str, spec: JobSpec, model_sha: str, now: float, requester: str = "",
        lease: tuple[str, str, float] | None = None,
    ) -> int | None:
        with self._tx():
            self._execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, spec.model_dump_json(), "offered", 0, model_sha, "", now, now, requester, 0),
            )
            self._execute("INSERT INTO models VALUES (?,?,?) ON CONFLICT DO NOTHING", (model_sha, job_id, 0))
            for site in spec.sites:
                self._execute("INSERT INTO job_sites VALUES (?,?,?,?,?,?)", (job_id, site, "offered", "[]", None, now))
            if lease is None:
                return None
            holder, address, ttl_s = lease
            self._execute("INSERT INTO leases VALUES (?,?,?,?,?)", (job_id, holder, address, 1, self.db_now() + ttl_s))
            return 1

    def get_job(self, job_id: str) -> JobRow | None:
        row = self._one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id=?", (job_id,))
        if row is None:
            return None
        job = _load_job(row)
        if isinstance(job, str):
            raise UnreadableRow(f"job {job_id}: {job}")
        return job

    def list_jobs(self, states: tuple[str, ...] | None = None) -> list[JobRow]:
        where = f" WHERE state IN ({','.join('?' * len(states))})" if states else ""
        out = []
        for r in self._query(f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY created_at, job_id", states or ()):
            job = _load_job(r)
            if isinstance(job, str):
                log.warning("stored_row_skipped", table="jobs", job=r["job_id"], reason=job)
            else:
                out.append(job)
        return out

    def count_jobs(self) -> dict[str, int]:
        return {r["state"]: int(r["n"]) for r in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}

    def set_job_state(self, job_id: str, state: str, reason: str, now: float, fence: Fence | None = None) -> None:
        with self._tx():
            self._fence(fence)
            self._execute(
                "UPDATE jobs SET state=?, reason=?, updated_at=? WHERE job_id=?", (state, reason, now, job_id)
            )
            if state in ENDED:
                self._execute("INSERT INTO followups VALUES (?,?,?) ON CONFLICT DO NOTHING", (job_id, state, now))

    def followups(self) -> list[tuple[str, str]]:
        return [(r["job_id"], r["state"]) for r in self._query("SELECT job_id, state FROM followups ORDER BY at")]

    def followup_done(self, job_id: str) -> None:
        with self._tx():
            self._execute("DELETE FROM followups WHERE job_id=?", (job_id,))

    def followup_pending(self, job_id: str) -> bool:
        return self._one("SELECT 1 AS x FROM followups WHERE job_id=?", (job_id,)) is not None

    def set_paused(self, job_id: str, paused: bool, now: float, fence: Fence | None = None) -> None:
        with self._tx():
            self._fence(fence)
            self._execute("UPDATE jobs SET paused=?, updated_at=? WHERE job_id=?", (int(paused), now, job_id))

    def record_decision(self, job_id: str, d: SiteDecision, fence: Fence | None = None) -> None:
        with self._tx():
            self._fence(fence)
            self._execute(
                "INSERT INTO job_sites VALUES (?,?,?,?,?,?) ON CONFLICT (job_id, site) DO UPDATE SET "
                "decision=excluded.decision, reasons=excluded.reasons, epsilon_planned=excluded.epsilon_planned, "
                "at=excluded.at",
                (job_id, d.site, d.decision, json.dumps(d.reasons), d.epsilon_planned, d.at),
            )

    def invited(self, job_id: str, site: str) -> bool:
        return self._one("SELECT 1 AS x FROM job_sites WHERE job_id=? AND site=?", (job_id, site)) is not None

    def decisions(self, job_id: str) -> list[SiteDecision]:
        rows = _good(self._query("SELECT * FROM job_sites WHERE job_id=? ORDER BY site", (job_id,)), checks.decision,
                     "job_sites")
        return [
            SiteDecision(r["site"], r["decision"], json.loads(r["reasons"]), r["epsilon_planned"], r["at"])
            for r in rows
        ]

    # rounds
    def open_round(
        self, job_id: str, rnd: int, kind: str, model_in: str, now: float, deadline: float, fence: Fence | None = None,
    ) -> None:
        with self._tx():
            self._fence(fence)
            self._execute(
                "INSERT INTO rounds (job_id, round, kind, state, started_at, deadline, model_in)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (job_id, rnd, kind, "open", now, deadline, model_in),
            )
            self._execute("UPDATE jobs SET round=?, state='running', updated_at=? WHERE job_id=?", (rnd, now, job_id))

    def get_round(self, job_id: str, rnd: int) -> RoundRow | None:
        rows = _good(self._query("SELECT * FROM rounds WHERE job_id=? AND round=?", (job_id, rnd)), checks.round_,
                     "rounds")
        return RoundRow(**rows[0]) if rows else None

    def rounds(self, job_id: str) -> list[RoundRow]:
        rows = self._query("SELECT * FROM rounds WHERE job_id=? ORDER BY round", (job_id,))
        return [RoundRow(**r) for r in _good(rows, checks.round_, "rounds")]

    def add_update(self, u: UpdateRow, evaluation: EvalMetrics | None, fence: Fence | None = None) -> bool:
        with self._tx():
            self._fence(fence)
            added = self._execute(
                "INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (u.job_id, u.round, u.site, u.sha256, u.num_samples, u.train_loss, u.epsilon, u.received_at,
                 int(u.share_tracking)),
            )
            if added == 0:
                return False
            for unit, eps in u.privacy:
                self._execute("INSERT INTO update_privacy VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                              (u.job_id, u.round, u.site, unit, eps))
            if evaluation is not None:
                self._insert_eval(u.job_id, u.round - 1, u.site, evaluation)
            return True

    def get_update(self, job_id: str, rnd: int, site: str) -> UpdateRow | None:
        row = self._one("SELECT * FROM updates WHERE job_id=? AND round=? AND site=?", (job_id, rnd, site))
        if row is not None and checks.update(row) is not None:
            raise UnreadableRow(f"update of {site} in round {rnd} of {job_id}: {checks.update(row)}")
        return _update(row) if row else None

    def updates(self, job_id: str, rnd: int | None = None) -> list[UpdateRow]:
        if rnd is None:
            rows = self._query("SELECT * FROM updates WHERE job_id=? ORDER BY round, site", (job_id,))
        else:
            rows = self._query("SELECT * FROM updates WHERE job_id=? AND round=? ORDER BY site", (job_id, rnd))
        return [_update(r) for r in _good(rows, checks.update, "updates")]

    def site_spend(self, job_id: str) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for r in self._query("SELECT site, unit, epsilon FROM update_privacy WHERE job_id=? ORDER BY round",
                             (job_id,)):
            if r["epsilon"] is None or checks.finite_in(r["epsilon"], 0, checks.MAX_EPSILON):
                out.setdefault(r["site"], {})[r["unit"]] = r["epsilon"]
        return out

    def close_round(
        self, job_id: str, rnd: int, model_out: str | None, n_sites: int, n_samples: int,
        train_loss: float | None, now: float, fence: Fence | None = None,
    ) -> None:
        with self._tx():
            self._fence(fence)
            closed = self._execute(
                "UPDATE rounds SET state='closed', closed_at=?, model_out=?, n_sites=?, n_samples=?, train_loss=?"
                " WHERE job_id=? AND round=? AND state='open'",
                (now, model_out, n_sites, n_samples, train_loss, job_id, rnd),
            )
            if closed and model_out is not None:
                self._execute("INSERT INTO models VALUES (?,?,?) ON CONFLICT DO NOTHING", (model_out, job_id, rnd))
                self._execute("UPDATE jobs SET model_sha=?, updated_at=? WHERE job_id=?", (model_out, now, job_id))

    def add_evaluation(
        self, job_id: str, version: int, site: str, m: EvalMetrics, fence: Fence | None = None,
    ) -> bool:
        with self._tx():
            self._fence(fence)
            return self._insert_eval(job_id, version, site, m)

    def _insert_eval(self, job_id: str, version: int, site: str, m: EvalMetrics) -> bool:
        return self._execute(
            "INSERT INTO evaluations VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (job_id, version, site, m.n, m.loss, m.auc),
        ) > 0

    def evaluations(self, job_id: str, version: int | None = None) -> dict[int, dict[str, EvalMetrics]]:
        out: dict[int, dict[str, EvalMetrics]] = {}
        where, params = ("job_id=?", (job_id,)) if version is None else ("job_id=? AND version=?", (job_id, version))
        rows = self._query(f"SELECT * FROM evaluations WHERE {where} ORDER BY version, site", params)
        for r in _good(rows, checks.evaluation, "evaluations"):
            out.setdefault(r["version"], {})[r["site"]] = EvalMetrics(n=r["n"], loss=r["loss"], auc=r["auc"])
        return out

    def add_rejection(
        self, job_id: str | None, rnd: int | None, site: str | None, reason: str, detail: str, now: float
    ) -> None:
        with self._tx():
            self._execute(
                "INSERT INTO rejections (job_id, round, site, reason, detail, at) VALUES (?,?,?,?,?,?)",
                (job_id, rnd, site, reason, detail, now),
            )

    def rejections(self, job_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if job_id is None:
            return self._query("SELECT * FROM rejections ORDER BY id DESC LIMIT ?", (limit,))
        return self._query("SELECT * FROM rejections WHERE job_id=? ORDER BY id DESC LIMIT ?", (job_id, limit))

    def register_model(self, sha: str, job_id: str, version: int) -> None:
        with self._tx():
            self._execute("INSERT INTO models VALUES (?,?,?) ON CONFLICT DO NOTHING", (sha, job_id, version))

    def is_model(self, sha: str) -> bool:
        return self._one("SELECT 1 AS x FROM models WHERE sha=?", (sha,)) is not None

    def upsert_sites(self, rows: list[tuple[str, str, float, dict[str, Any]]]) -> None:
        with self._tx():
            for site, state, at, info in rows:
                self._execute(
                    "INSERT INTO sites VALUES (?,?,?,?) ON CONFLICT (site) DO UPDATE SET state=excluded.state, "
                    "at=excluded.at, info=excluded.info",
                    (site, state, at, json.dumps(info)),
                )

    def sites(self) -> list[dict[str, Any]]:
        rows = _good(self._query("SELECT * FROM sites ORDER BY site"), checks.site, "sites")
        return [{"site": r["site"], "state": r["state"], "at": r["at"], **json.loads(r["info"])} for r in rows]

    def site_decisions(self, site: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE s.site=?", (site,)) if site is not None else ("", ())
        rows = self._query(
            "SELECT s.job_id, s.site, s.decision, s.reasons, s.epsilon_planned, s.at, j.state AS job_state, j.spec,"
            " (SELECT u.epsilon FROM updates u WHERE u.job_id=s.job_id AND u.site=s.site"
            "  ORDER BY u.round DESC LIMIT 1) AS epsilon_spent"
            f" FROM job_sites s JOIN jobs j ON j.job_id=s.job_id {where} ORDER BY s.at DESC, s.job_id, s.site",
            params,
        )
        # The unit of both ε columns is the job's (`privacy.unit`: record = per patient, site = per hospital): read
        # once per job, not once per row.
        units: dict[str, str] = {}
        out = []
        for r in _good(rows, checks.decision, "job_sites"):
            if r["job_id"] not in units:
                try:
                    units[r["job_id"]] = str(json.loads(r["spec"])["privacy"].get("unit", "site"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    units[r["job_id"]] = "site"
            spent = r["epsilon_spent"]
            out.append({**{k: v for k, v in r.items() if k != "spec"}, "reasons": json.loads(r["reasons"]),
                        "epsilon_unit": units[r["job_id"]],
                        "epsilon_spent": spent if checks.finite_in(spent, 0, checks.MAX_EPSILON) else None})
        return out


class UnreadableRow(RuntimeError):
    """A stored row fails `checks` (written by an older version, by hand, or by a bug): the caller must not use it."""


def _good(rows: list[Row], check: Callable[[Row], str | None], table: str) -> list[Row]:
    """The rows that pass `check`; the others are left out (and logged): a reader never stops on a bad row."""
    good = []
    for r in rows:
        bad = check(r)
        if bad is None:
            good.append(r)
        else:
            log.warning("stored_row_skipped", table=table, reason=bad[:300])
    return good


def _update(row: Row) -> UpdateRow:
    return UpdateRow(**{**row, "share_tracking": bool(row["share_tracking"])})


def _load_job(row: Row) -> JobRow | str:
    """The job of a row, or why the row cannot be used (its spec is parsed once, here)."""
    spec = checks.job_spec(row)
    if isinstance(spec, str):
        return spec
    bad = checks.job(row, spec)
    return bad if bad is not None else _job(row, spec)


def _job(row: Row, spec: JobSpec) -> JobRow:
    return JobRow(
        job_id=row["job_id"], spec=spec, state=row["state"],
        round=row["round"], model_sha=row["model_sha"], reason=row["reason"],
        created_at=row["created_at"], updated_at=row["updated_at"], requester=row["requester"],
        paused=bool(row["paused"]),
    )
