"""The audit chain's head kept outside the hospital: an administrator who rewrites an entry and re-chains the log
gets a log that verifies on its own, but no longer contains the head the aggregator recorded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from agent.audit import AuditLog, verify
from aggregator.db import Db
from aggregator.metrics import AggregatorMetrics
from aggregator.sites import SiteRegistry
from aggregator.store import open_store
from fedsilo.cli import main
from tests.auditlog import rechain


def test_a_rewritten_and_rechained_log_no_longer_holds_the_aggregators_head(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    for i in range(2):
        log.append("job_decision", job_id=f"job-{i}", decision="accepted")
    at_two = log.head  # what the aggregator received with the second answer
    for i in range(2, 4):
        log.append("job_decision", job_id=f"job-{i}", decision="accepted")
    recorded = log.head
    assert verify(log.path, recorded=recorded).ok and verify(log.path, recorded=(None, recorded[1])).ok
    assert verify(log.path, recorded=at_two).ok  # an older head is still in the chain

    forged = tmp_path / "forged.log"
    forged.write_text(rechain(log.path.read_text().splitlines(), edit_seq=2, decision="refused"))
    assert verify(forged).ok  # on its own the forgery is consistent
    assert verify(forged, expected_head=(4, json.loads(forged.read_text().splitlines()[-1])["hash"])).ok
    for head in (recorded, at_two):
        result = verify(forged, recorded=head)
        assert not result.ok and "the chain was rewritten and re-chained" in result.problems[0], result.problems
    assert "no entry has the hash" in verify(forged, recorded=(None, recorded[1])).problems[0]
    cut = tmp_path / "cut.log"
    cut.write_text("".join(line + "\n" for line in log.path.read_text().splitlines()[:3]))
    assert "has no entry 4" in verify(cut, recorded=recorded).problems[0]

    runner = CliRunner()
    plain = runner.invoke(main, ["audit", "verify", str(forged)])
    assert plain.exit_code == 0 and "chain intact" in plain.output
    answer = tmp_path / "head.json"
    answer.write_text(json.dumps({"site": "hungary", "seq": recorded[0], "sha256": recorded[1], "at": 1.0,
                                  "conflicts": 0}))
    for given in (f"{recorded[0]}:{recorded[1]}", recorded[1], str(answer)):
        out = runner.invoke(main, ["audit", "verify", str(forged), "--aggregator-head", given])
        assert out.exit_code == 1 and "TAMPERED" in out.output and "rewritten" in out.output, out.output
        ok = runner.invoke(main, ["audit", "verify", str(log.path), "--aggregator-head", given])
        assert ok.exit_code == 0 and "chain intact" in ok.output, ok.output
    bad = runner.invoke(main, ["audit", "verify", str(log.path), "--aggregator-head", "nonsense"])
    assert bad.exit_code == 2 and "--aggregator-head" in bad.output


def test_the_aggregator_keeps_the_first_head_it_saw_for_an_entry(tmp_path: Path) -> None:
    db = Db(open_store(f"sqlite:///{tmp_path / 'state.db'}"))
    metrics = AggregatorMetrics()
    sites = SiteRegistry(db, metrics)
    honest, forged = "a" * 64, "f" * 64

    async def run() -> None:
        sites.on_audit_head("hungary", 4, honest, 1.0)
        await sites.flush()
        for _ in range(3):  # the agent restarted on a rewritten log: same entry count, another hash
            sites.on_audit_head("hungary", 4, forged, 2.0)
        sites.on_audit_head("hungary", 3, forged, 3.0)  # an older head: nothing to learn
        await sites.flush()

    asyncio.run(run())
    assert db.store.audit_head("hungary") == {"site": "hungary", "seq": 4, "sha256": honest, "at": 1.0,
                                              "conflicts": 3}
    assert metrics.audit_head_conflicts.labels("hungary")._value.get() == 3
    restarted = SiteRegistry(db, AggregatorMetrics())
    asyncio.run(restarted.load())
    restarted.on_audit_head("hungary", 4, forged, 4.0)
    assert restarted._head_conflicts == {"hungary": 1}
    db.shutdown()
