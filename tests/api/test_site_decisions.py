"""`StateStore.site_decisions` (the console's site view) gives the same answers on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import SiteDecision, StateStore, UpdateRow, open_store
from federation.jobs import JobSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SHA0, SHA1, SHA2 = "0" * 64, "1" * 64, "2" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    url = f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_store(url)
    yield s
    s.close()


def test_each_sites_answers_with_the_latest_epsilon_per_job(store: StateStore) -> None:
    spec = JobSpec.from_yaml(EXAMPLE.read_text()).model_copy(update={"sites": ["cleveland", "hungary"]})
    store.create_job("job-a", spec, SHA0, 1.0)
    store.create_job("job-b", spec, SHA0, 2.0)
    store.record_decision("job-a", SiteDecision("cleveland", "accepted", [], 9.5, 3.0))
    store.record_decision("job-a", SiteDecision("hungary", "refused", ["no data", "cohort too small"], None, 4.0))
    store.open_round("job-a", 1, "train", SHA0, 5.0, 65.0)
    store.add_update(UpdateRow("job-a", 1, "cleveland", SHA1, 100, 0.6, 1.25, 6.0), None)
    store.open_round("job-a", 2, "train", SHA1, 7.0, 67.0)
    store.add_update(UpdateRow("job-a", 2, "cleveland", SHA2, 100, 0.5, 2.5, 8.0), None)

    rows = store.site_decisions()
    assert [(r["job_id"], r["site"]) for r in rows] == [
        ("job-a", "hungary"), ("job-a", "cleveland"), ("job-b", "cleveland"), ("job-b", "hungary")]
    by_key = {(r["job_id"], r["site"]): r for r in rows}
    assert by_key["job-a", "cleveland"] == {
        "job_id": "job-a", "site": "cleveland", "decision": "accepted", "reasons": [], "epsilon_planned": 9.5,
        "epsilon_spent": 2.5, "epsilon_unit": "record", "at": 3.0, "job_state": "running"}
    assert by_key["job-a", "hungary"]["reasons"] == ["no data", "cohort too small"]
    assert by_key["job-a", "hungary"]["epsilon_spent"] is None
    assert by_key["job-b", "hungary"]["decision"] == "offered"
    assert [(r["job_id"], r["decision"]) for r in store.site_decisions("hungary")] == [
        ("job-a", "refused"), ("job-b", "offered")]
    assert store.site_decisions("nowhere") == []


def test_each_sites_epsilon_is_kept_per_unit(store: StateStore) -> None:
    spec = JobSpec.from_yaml(EXAMPLE.read_text())
    store.create_job("job-a", spec, SHA0, 1.0)
    store.open_round("job-a", 1, "train", SHA0, 5.0, 65.0)
    # hungary's policy requires the site unit too: its updates report ε per patient and per site.
    store.add_update(UpdateRow("job-a", 1, "hungary", SHA1, 100, 0.6, 0.4, 6.0, True,
                               (("record", 0.4), ("site", 12.5))), None)
    store.add_update(UpdateRow("job-a", 1, "cleveland", SHA2, 100, 0.6, 0.5, 6.0, True, (("record", 0.5),)), None)
    store.open_round("job-a", 2, "train", SHA1, 7.0, 67.0)
    store.add_update(UpdateRow("job-a", 2, "hungary", SHA2, 100, 0.5, 0.7, 8.0, True,
                               (("record", 0.7), ("site", 17.0))), None)
    assert store.site_spend("job-a") == {"hungary": {"record": 0.7, "site": 17.0}, "cleveland": {"record": 0.5}}
    assert store.site_spend("job-b") == {}
