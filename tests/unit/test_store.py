"""The shared suite every StateStore implementation must pass: SQLite and PostgreSQL (a private server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import SiteDecision, StateStore, UpdateRow, open_store
from federation.jobs import JobSpec
from federation.messages import EvalMetrics

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SHA0, SHA1 = "0" * 64, "1" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[StateStore]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def spec() -> JobSpec:
    return JobSpec.from_yaml(EXAMPLE.read_text())


def test_job_lifecycle(store: StateStore, spec: JobSpec) -> None:
    store.create_job("job-a", spec, SHA0, 1.0)
    job = store.get_job("job-a")
    assert job is not None and job.state == "offered" and job.round == 0 and job.spec == spec
    assert {d.site: d.decision for d in store.decisions("job-a")} == dict.fromkeys(spec.sites, "offered")
    assert store.is_model(SHA0) and not store.is_model(SHA1)
    store.record_decision("job-a", SiteDecision("hungary", "refused", ["no data"], None, 2.0))
    assert next(d for d in store.decisions("job-a") if d.site == "hungary").reasons == ["no data"]
    store.open_round("job-a", 1, "train", SHA0, 3.0, 63.0)
    job = store.get_job("job-a")
    assert job is not None and job.state == "running" and job.round == 1
    store.set_job_state("job-a", "failed", "why", 4.0)
    assert [j.job_id for j in store.list_jobs(("failed",))] == ["job-a"]
    assert store.list_jobs(("running",)) == []


def test_updates_are_unique_per_job_round_site(store: StateStore, spec: JobSpec) -> None:
    store.create_job("job-a", spec, SHA0, 1.0)
    store.open_round("job-a", 1, "train", SHA0, 1.0, 61.0)
    u = UpdateRow("job-a", 1, "cleveland", SHA1, 200, 0.5, 1.5, 2.0)
    ev = EvalMetrics(n=100, loss=0.7, auc=0.5)
    assert store.add_update(u, ev) is True
    assert store.add_update(u, ev) is False
    assert store.updates("job-a", 1) == [u]
    assert store.get_update("job-a", 1, "cleveland") == u
    assert store.evaluations("job-a") == {0: {"cleveland": ev}}


def test_close_round_moves_the_global_model_atomically(store: StateStore, spec: JobSpec) -> None:
    store.create_job("job-a", spec, SHA0, 1.0)
    store.open_round("job-a", 1, "train", SHA0, 1.0, 61.0)
    store.close_round("job-a", 1, SHA1, 3, 600, 0.4, 5.0)
    r = store.get_round("job-a", 1)
    assert r is not None and r.state == "closed" and r.model_out == SHA1 and r.n_sites == 3
    job = store.get_job("job-a")
    assert job is not None and job.model_sha == SHA1 and store.is_model(SHA1)
    store.close_round("job-a", 1, SHA0, 1, 1, 0.0, 6.0)  # a second close of a closed round changes nothing
    job = store.get_job("job-a")
    assert job is not None and job.model_sha == SHA1


def test_state_survives_reopening(store_url: str, spec: JobSpec) -> None:
    url = store_url
    s = open_store(url)
    s.create_job("job-a", spec, SHA0, 1.0)
    s.add_rejection("job-a", 1, "hungary", "non_finite", "NaN", 2.0)
    s.upsert_sites([("hungary", "online", 3.0, {"version": "x"})])
    s.close()
    s = open_store(url)
    assert s.get_job("job-a") is not None
    assert s.rejections("job-a")[0]["reason"] == "non_finite"
    assert s.sites() == [{"site": "hungary", "state": "online", "at": 3.0, "version": "x"}]
    s.close()


def test_unknown_store_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported state store URL"):
        open_store("mysql://x")


def test_follow_ups_of_ended_jobs_are_kept_until_done(store: StateStore, spec: JobSpec) -> None:
    store.create_job("job-a", spec, SHA0, 1.0)
    store.set_job_state("job-a", "running", "", 2.0)
    assert store.followups() == [] and not store.followup_pending("job-a")
    store.set_job_state("job-a", "cancelled", "by operator", 3.0)
    assert store.followups() == [("job-a", "cancelled")] and store.followup_pending("job-a")
    store.followup_done("job-a")
    assert store.followups() == []


def test_counts_and_one_version_of_evaluations(store: StateStore, spec: JobSpec) -> None:
    store.create_job("job-a", spec, SHA0, 1.0)
    store.create_job("job-b", spec, SHA0, 1.0)
    store.set_job_state("job-b", "failed", "x", 2.0)
    assert store.count_jobs() == {"offered": 1, "failed": 1}
    store.open_round("job-a", 1, "train", SHA0, 1.0, 61.0)
    for rnd, site in ((1, "cleveland"), (1, "hungary")):
        store.add_update(UpdateRow("job-a", rnd, site, SHA1, 200, 0.5, 1.5, 2.0), EvalMetrics(n=10, auc=0.6))
    store.add_evaluation("job-a", 1, "cleveland", EvalMetrics(n=10, auc=0.7))
    assert set(store.evaluations("job-a", 0)) == {0} and set(store.evaluations("job-a", 0)[0]) == {
        "cleveland", "hungary"}
    assert set(store.evaluations("job-a")) == {0, 1}
    assert [u.site for u in store.updates("job-a")] == ["cleveland", "hungary"]


def test_rows_that_fail_their_checks_are_quarantined_and_never_stop_a_reader(store: StateStore, spec: JobSpec) -> None:
    """Rows written by an older version, by hand or by a bug: each kind is moved aside with its reason, its job
    fails with it, and every reader skips such a row instead of raising."""
    sql = store._execute  # type: ignore[attr-defined]
    for job in ("job-a", "job-b", "job-c"):
        store.create_job(job, spec, SHA0, 1.0)
        store.open_round(job, 1, "train", SHA0, 1.0, 61.0)
    store.add_update(UpdateRow("job-a", 1, "cleveland", SHA1, 200, 0.5, 1.5, 2.0), EvalMetrics(n=10, auc=0.6))
    sql("INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?)", ("job-a", 1, "hungary", SHA1, 2**62, 0.5, 1.0, 2.0, 1))
    sql("INSERT INTO evaluations VALUES (?,?,?,?,?,?)", ("job-b", 0, "hungary", 10, 0.5, 1e308))
    sql("UPDATE jobs SET spec=? WHERE job_id=?", ("{not a spec", "job-c"))
    sql("INSERT INTO sites VALUES (?,?,?,?)", ("mallory", "online", float("inf"), "{}"))
    sql("INSERT INTO sites VALUES (?,?,?,?)", ("eve", "online", 1.0, "[NaN]"))
    store.upsert_sites([("cleveland", "online", 3.0, {"version": "x"})])

    # Before the quarantine, readers already skip what they cannot serve.
    assert [u.site for u in store.updates("job-a", 1)] == ["cleveland"]
    assert store.evaluations("job-b") == {}
    assert [s["site"] for s in store.sites()] == ["cleveland"]
    assert [j.job_id for j in store.list_jobs()] == ["job-a", "job-b"]

    moved = [q for job in ("job-a", "job-b", "job-c") for q in store.quarantine_job(job, 10.0)]
    moved += store.quarantine_sites(10.0)
    assert {(q.table, q.key) for q in moved} == {
        ("updates", "job-a/1/hungary"), ("evaluations", "job-b/0/hungary"), ("jobs", "job-c"),
        ("sites", "mallory"), ("sites", "eve")}
    assert {q["row_key"] for q in store.quarantined()} == {q.key for q in moved}
    assert all(store.get_job(j).state == "failed" for j in ("job-a", "job-b"))  # type: ignore[union-attr]
    assert "num_samples" in store.get_job("job-a").reason  # type: ignore[union-attr]
    assert dict(store.followups()).keys() == {"job-a", "job-b"}
    assert store.quarantine_job("job-a", 11.0) == store.quarantine_sites(11.0) == []  # nothing left to move
    assert store.count_jobs() == {"failed": 3}


def test_one_writer_per_job_the_lease_and_its_fence(store: StateStore, spec: JobSpec) -> None:
    from aggregator.store.leases import Fence, FencedOut

    token = store.create_job("job-a", spec, SHA0, 1.0, lease=("replica-a", "https://a:8443", 0.5))
    assert token == 1
    a = Fence("job-a", "replica-a", 1)
    store.open_round("job-a", 1, "train", SHA0, 1.0, 61.0, fence=a)
    assert store.acquire_lease("job-a", "replica-b", "https://b:8443", 0.5) is None  # held, not expired
    assert store.takeable_jobs("replica-b") == []
    assert store.renew_leases([a], 0.2) == {"job-a"}
    lease = store.lease("job-a")
    assert lease is not None and (lease.holder, lease.address, lease.token) == ("replica-a", "https://a:8443", 1)
    wait_until = store.db_now() + 0.3
    while store.db_now() < wait_until:  # replica-a goes silent past its lease
        pass
    assert store.takeable_jobs("replica-b") == ["job-a"]
    assert store.acquire_lease("job-a", "replica-b", "https://b:8443", 5.0) == 2
    b = Fence("job-a", "replica-b", 2)
    # replica-a wakes up: its renewal and its late writes are refused, nothing of them lands.
    assert store.renew_leases([a], 5.0) == set()
    with pytest.raises(FencedOut):
        store.add_update(UpdateRow("job-a", 1, "cleveland", SHA1, 200, 0.5, 1.5, 2.0), None, fence=a)
    with pytest.raises(FencedOut):
        store.set_job_state("job-a", "failed", "stale writer", 3.0, fence=a)
    assert store.updates("job-a", 1) == [] and store.get_job("job-a").state == "running"  # type: ignore[union-attr]
    assert store.add_update(UpdateRow("job-a", 1, "cleveland", SHA1, 200, 0.5, 1.5, 2.0), None, fence=b)
    # The same replica taking its own lease again (a restart) gets a new token: its former self is fenced too.
    assert store.acquire_lease("job-a", "replica-b", "https://b:8443", 5.0) == 3
    with pytest.raises(FencedOut):
        store.set_paused("job-a", True, 4.0, fence=b)
    # A replica shutting down hands its lease over: takeable at once by another, whose token is still larger.
    store.hand_over_lease(Fence("job-a", "replica-b", 3))
    assert store.takeable_jobs("replica-c") == ["job-a"]
    assert store.acquire_lease("job-a", "replica-c", "https://c:8443", 5.0) == 4
    store.release_lease(Fence("job-a", "replica-c", 4))
    assert store.lease("job-a") is None


def test_a_sites_audit_head_only_moves_forward_and_conflicts_add_up(store: StateStore) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    store.record_audit_heads([("hungary", 5, a, 1.0, 0)])
    store.record_audit_heads([("hungary", 4, b, 2.0, 0), ("cleveland", 1, c, 2.0, 0)])  # older: ignored
    assert store.audit_head("hungary") == {"site": "hungary", "seq": 5, "sha256": a, "at": 1.0, "conflicts": 0}
    store.record_audit_heads([("hungary", 5, a, 3.0, 2)])  # the same entry reported with another hash, twice
    store.record_audit_heads([("hungary", 7, b, 4.0, 0)])
    assert store.audit_head("hungary") == {"site": "hungary", "seq": 7, "sha256": b, "at": 4.0, "conflicts": 2}
    assert [h["site"] for h in store.audit_heads()] == ["cleveland", "hungary"]
    assert store.audit_head("eve") is None
