"""Durable job, round and update state behind one interface.

`StateStore` is what the round engine talks to; `SQLiteStore` (WAL, synchronous=FULL) is the default and
`PostgresStore` serves production; both share every query (`SqlStore`) and one test suite.
Every mutating method is one transaction, so a crash leaves either the old or the new state, never a mix.
Calls are synchronous; the service runs them on one dedicated thread (`aggregator.service.Db`), which
also makes the store single-writer.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.jobs import JobSpec
from federation.messages import EvalMetrics


@dataclass(frozen=True)
class JobRow:
    job_id: str
    spec: JobSpec
    state: str  # offered | running | finished | failed | cancelled
    round: int  # current round; rounds+1 is the final evaluation
    model_sha: str  # current global model
    reason: str
    created_at: float
    updated_at: float
    requester: str
    paused: bool = False


@dataclass(frozen=True)
class RoundRow:
    job_id: str
    round: int
    kind: str  # train | evaluate
    state: str  # open | closed
    started_at: float
    deadline: float
    closed_at: float | None
    model_in: str
    model_out: str | None
    n_sites: int
    n_samples: int
    train_loss: float | None


@dataclass(frozen=True)
class UpdateRow:
    job_id: str
    round: int
    site: str
    sha256: str
    num_samples: int
    train_loss: float
    epsilon: float | None
    received_at: float
    share_tracking: bool = True
    # ε per unit the site's mechanisms protect (record: per patient; site: per hospital), as its envelope said.
    privacy: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True)
class SiteDecision:
    site: str
    decision: str  # offered | accepted | refused | stopped
    reasons: list[str]
    epsilon_planned: float | None
    at: float


class StateStore(ABC):
    """The aggregator's durable state. Implementations must pass `tests/unit/test_store.py`."""

    @abstractmethod
    def create_job(self, job_id: str, spec: JobSpec, model_sha: str, now: float, requester: str = "") -> None: ...

    @abstractmethod
    def get_job(self, job_id: str) -> JobRow | None: ...

    @abstractmethod
    def list_jobs(self, states: tuple[str, ...] | None = None) -> list[JobRow]: ...

    @abstractmethod
    def set_job_state(self, job_id: str, state: str, reason: str, now: float) -> None: ...

    @abstractmethod
    def set_paused(self, job_id: str, paused: bool, now: float) -> None: ...

    @abstractmethod
    def record_decision(self, job_id: str, d: SiteDecision) -> None: ...

    @abstractmethod
    def decisions(self, job_id: str) -> list[SiteDecision]: ...

    @abstractmethod
    def open_round(self, job_id: str, rnd: int, kind: str, model_in: str, now: float, deadline: float) -> None:
        """Start round `rnd` (idempotent) and move the job to it; the job becomes `running`."""

    @abstractmethod
    def get_round(self, job_id: str, rnd: int) -> RoundRow | None: ...

    @abstractmethod
    def rounds(self, job_id: str) -> list[RoundRow]: ...

    @abstractmethod
    def add_update(self, u: UpdateRow, evaluation: EvalMetrics | None) -> bool:
        """Insert an acknowledged update (and the evaluation it carried); False if (job, round, site) exists."""

    @abstractmethod
    def get_update(self, job_id: str, rnd: int, site: str) -> UpdateRow | None: ...

    @abstractmethod
    def site_spend(self, job_id: str) -> dict[str, dict[str, float | None]]:
        """Each site's latest reported ε on the job, per unit."""

    @abstractmethod
    def updates(self, job_id: str, rnd: int) -> list[UpdateRow]: ...

    @abstractmethod
    def close_round(
        self, job_id: str, rnd: int, model_out: str | None, n_sites: int, n_samples: int,
        train_loss: float | None, now: float,
    ) -> None:
        """Close round `rnd` and record its output model as the job's global model, in one transaction."""

    @abstractmethod
    def add_evaluation(self, job_id: str, version: int, site: str, m: EvalMetrics) -> bool: ...

    @abstractmethod
    def evaluations(self, job_id: str) -> dict[int, dict[str, EvalMetrics]]: ...

    @abstractmethod
    def add_rejection(
        self, job_id: str | None, rnd: int | None, site: str | None, reason: str, detail: str, now: float
    ) -> None: ...

    @abstractmethod
    def rejections(self, job_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]: ...

    @abstractmethod
    def register_model(self, sha: str, job_id: str, version: int) -> None: ...

    @abstractmethod
    def is_model(self, sha: str) -> bool: ...

    @abstractmethod
    def upsert_site(self, site: str, state: str, at: float, info: dict[str, Any]) -> None: ...

    @abstractmethod
    def sites(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def site_decisions(self, site: str | None = None) -> list[dict[str, Any]]:
        """Each site's decision on each job offered to it, newest first, with the job's state and the ε the
        site reported with its latest update in that job (None before its first update), in `epsilon_unit`."""

    @abstractmethod
    def close(self) -> None: ...


_SCHEMA = """
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
  model_in TEXT NOT NULL, model_out TEXT, n_sites INTEGER NOT NULL DEFAULT 0, n_samples INTEGER NOT NULL DEFAULT 0,
  train_loss DOUBLE PRECISION, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS updates (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, sha256 TEXT NOT NULL,
  num_samples INTEGER NOT NULL, train_loss DOUBLE PRECISION NOT NULL, epsilon DOUBLE PRECISION,
  received_at DOUBLE PRECISION NOT NULL, share_tracking INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY (job_id, round, site));
CREATE TABLE IF NOT EXISTS evaluations (
  job_id TEXT NOT NULL, version INTEGER NOT NULL, site TEXT NOT NULL, n INTEGER NOT NULL, loss DOUBLE PRECISION,
  auc DOUBLE PRECISION, PRIMARY KEY (job_id, version, site));
CREATE TABLE IF NOT EXISTS rejections (
  id {serial} PRIMARY KEY, job_id TEXT, round INTEGER, site TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL,
  at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS update_privacy (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, unit TEXT NOT NULL, epsilon DOUBLE PRECISION,
  PRIMARY KEY (job_id, round, site, unit));
CREATE TABLE IF NOT EXISTS models (sha TEXT PRIMARY KEY, job_id TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
  site TEXT PRIMARY KEY, state TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, info TEXT NOT NULL);
"""
_JOB_COLUMNS = "job_id, spec, state, round, model_sha, reason, created_at, updated_at, requester, paused"
Row = dict[str, Any]


class SqlStore(StateStore):
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
    def create_job(self, job_id: str, spec: JobSpec, model_sha: str, now: float, requester: str = "") -> None:
        with self._tx():
            self._execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, spec.model_dump_json(), "offered", 0, model_sha, "", now, now, requester, 0),
            )
            self._execute("INSERT INTO models VALUES (?,?,?) ON CONFLICT DO NOTHING", (model_sha, job_id, 0))
            for site in spec.sites:
                self._execute("INSERT INTO job_sites VALUES (?,?,?,?,?,?)", (job_id, site, "offered", "[]", None, now))

    def get_job(self, job_id: str) -> JobRow | None:
        row = self._one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id=?", (job_id,))
        return _job(row) if row else None

    def list_jobs(self, states: tuple[str, ...] | None = None) -> list[JobRow]:
        jobs = [_job(r) for r in self._query(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at, job_id")]
        return [j for j in jobs if states is None or j.state in states]

    def set_job_state(self, job_id: str, state: str, reason: str, now: float) -> None:
        with self._tx():
            self._execute(
                "UPDATE jobs SET state=?, reason=?, updated_at=? WHERE job_id=?", (state, reason, now, job_id)
            )

    def set_paused(self, job_id: str, paused: bool, now: float) -> None:
        with self._tx():
            self._execute("UPDATE jobs SET paused=?, updated_at=? WHERE job_id=?", (int(paused), now, job_id))

    def record_decision(self, job_id: str, d: SiteDecision) -> None:
        with self._tx():
            self._execute(
                "INSERT INTO job_sites VALUES (?,?,?,?,?,?) ON CONFLICT (job_id, site) DO UPDATE SET "
                "decision=excluded.decision, reasons=excluded.reasons, epsilon_planned=excluded.epsilon_planned, "
                "at=excluded.at",
                (job_id, d.site, d.decision, json.dumps(d.reasons), d.epsilon_planned, d.at),
            )

    def decisions(self, job_id: str) -> list[SiteDecision]:
        rows = self._query("SELECT * FROM job_sites WHERE job_id=? ORDER BY site", (job_id,))
        return [
            SiteDecision(r["site"], r["decision"], json.loads(r["reasons"]), r["epsilon_planned"], r["at"])
            for r in rows
        ]

    # rounds
    def open_round(self, job_id: str, rnd: int, kind: str, model_in: str, now: float, deadline: float) -> None:
        with self._tx():
            self._execute(
                "INSERT INTO rounds (job_id, round, kind, state, started_at, deadline, model_in)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (job_id, rnd, kind, "open", now, deadline, model_in),
            )
            self._execute("UPDATE jobs SET round=?, state='running', updated_at=? WHERE job_id=?", (rnd, now, job_id))

    def get_round(self, job_id: str, rnd: int) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds WHERE job_id=? AND round=?", (job_id, rnd))
        return RoundRow(**row) if row else None

    def rounds(self, job_id: str) -> list[RoundRow]:
        return [RoundRow(**r) for r in self._query("SELECT * FROM rounds WHERE job_id=? ORDER BY round", (job_id,))]

    def add_update(self, u: UpdateRow, evaluation: EvalMetrics | None) -> bool:
        with self._tx():
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
        return _update(row) if row else None

    def updates(self, job_id: str, rnd: int) -> list[UpdateRow]:
        rows = self._query("SELECT * FROM updates WHERE job_id=? AND round=? ORDER BY site", (job_id, rnd))
        return [_update(r) for r in rows]

    def site_spend(self, job_id: str) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for r in self._query("SELECT site, unit, epsilon FROM update_privacy WHERE job_id=? ORDER BY round",
                             (job_id,)):
            out.setdefault(r["site"], {})[r["unit"]] = r["epsilon"]
        return out

    def close_round(
        self, job_id: str, rnd: int, model_out: str | None, n_sites: int, n_samples: int,
        train_loss: float | None, now: float,
    ) -> None:
        with self._tx():
            closed = self._execute(
                "UPDATE rounds SET state='closed', closed_at=?, model_out=?, n_sites=?, n_samples=?, train_loss=?"
                " WHERE job_id=? AND round=? AND state='open'",
                (now, model_out, n_sites, n_samples, train_loss, job_id, rnd),
            )
            if closed and model_out is not None:
                self._execute("INSERT INTO models VALUES (?,?,?) ON CONFLICT DO NOTHING", (model_out, job_id, rnd))
                self._execute("UPDATE jobs SET model_sha=?, updated_at=? WHERE job_id=?", (model_out, now, job_id))

    def add_evaluation(self, job_id: str, version: int, site: str, m: EvalMetrics) -> bool:
        with self._tx():
            return self._insert_eval(job_id, version, site, m)

    def _insert_eval(self, job_id: str, version: int, site: str, m: EvalMetrics) -> bool:
        return self._execute(
            "INSERT INTO evaluations VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (job_id, version, site, m.n, m.loss, m.auc),
        ) > 0

    def evaluations(self, job_id: str) -> dict[int, dict[str, EvalMetrics]]:
        out: dict[int, dict[str, EvalMetrics]] = {}
        for r in self._query("SELECT * FROM evaluations WHERE job_id=? ORDER BY version, site", (job_id,)):
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

    def upsert_site(self, site: str, state: str, at: float, info: dict[str, Any]) -> None:
        with self._tx():
            self._execute(
                "INSERT INTO sites VALUES (?,?,?,?) ON CONFLICT (site) DO UPDATE SET state=excluded.state, "
                "at=excluded.at, info=excluded.info",
                (site, state, at, json.dumps(info)),
            )

    def sites(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM sites ORDER BY site")
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
        # The unit of both ε columns is the job's (`privacy.unit`: record = per patient, site = per hospital).
        return [{**{k: v for k, v in r.items() if k != "spec"}, "reasons": json.loads(r["reasons"]),
                 "epsilon_unit": json.loads(r["spec"])["privacy"].get("unit", "site")} for r in rows]


class SQLiteStore(SqlStore):
    """The default: one file, WAL journal, fsync on every commit (`synchronous=FULL`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA.format(serial="INTEGER"))  # INTEGER PRIMARY KEY is SQLite's rowid

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

    def close(self) -> None:
        self._db.close()


class PostgresStore(SqlStore):
    """For production (e.g. RDS): `postgresql://user:password@host:port/dbname`."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self._db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        with self._db.transaction():
            self._db.execute(_SCHEMA.format(serial="BIGSERIAL"))

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

    def close(self) -> None:
        self._db.close()


def _update(row: Row) -> UpdateRow:
    return UpdateRow(**{**row, "share_tracking": bool(row["share_tracking"])})


def _job(row: Row) -> JobRow:
    return JobRow(
        job_id=row["job_id"], spec=JobSpec.model_validate_json(row["spec"]), state=row["state"],
        round=row["round"], model_sha=row["model_sha"], reason=row["reason"],
        created_at=row["created_at"], updated_at=row["updated_at"], requester=row["requester"],
        paused=bool(row["paused"]),
    )


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///relative.db` or `sqlite:////absolute.db` URL (as SQLAlchemy reads
    them); None for any other URL."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_store(url: str) -> StateStore:
    """Pick an implementation from a URL: `sqlite:///relative.db`, `sqlite:////absolute.db` or `postgresql://...`."""
    path = sqlite_path(url)
    if path is not None:
        return SQLiteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(f"unsupported state store URL {url!r}; expected sqlite:///PATH or postgresql://...")


def now() -> float:
    return time.time()
