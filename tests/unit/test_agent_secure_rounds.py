"""A secure round's steps at the site (`agent.secure_rounds`) against a scripted aggregator: the unmask phase reveals
once per split and refuses (and audits) a second split even after a restart; unopenable shares are left out and
audited; a forged request is refused; a site not in the roster, or restarted after sharing, is excluded; the gate
sends secure-aggregation messages only under the site's own name."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog
from agent.egress import EgressGate, EgressRefusedError
from agent.policy import EgressPolicy
from agent.secagg import ExcludedError, SecAggRefusedError, ShareKeys
from agent.secure_rounds import SecureRounds
from agent.site import ActiveJob, Site
from agent.state import AgentState
from agent.status_server import AgentMetrics
from agent.verifier import Verifier
from federation.messages import RoundTask
from federation.mqtt import MqttLink
from federation.secagg.messages import MaskRoster, Reveal, ShareBundle, UnmaskRequest, UnmaskWork
from federation.signing import sign
from federation.transport import BrokerConfig, TLSConfig
from fedsilo.certs import local_pki
from tests.secagg_sites import (
    JOB,
    KEY,
    SITES,
    SPEC,
    ScriptedAggregator,
    inbox,
    request,
    roster,
    rounds,
    share_keys,
    site_plan,
    task_keys,
)

A, B, C, D = SITES


class FakeSite:
    """What `SecureRounds` uses of `agent.site.Site`, with a real state, audit log, metrics and share keys."""

    def __init__(self, root: Path, gate: ScriptedAggregator, name: str = B) -> None:
        self.name, self.gate = name, gate
        self.state = AgentState(root / name / "agent.db")
        self.audit = AuditLog(root / name / "audit.log")
        self.metrics = AgentMetrics()
        self.share_keys = ShareKeys(root / name / "secagg.key")
        self.events: list[tuple[str, str, list[str]]] = []

    def log_audit(self, event: str, **fields: Any) -> None:
        self.audit.append(event, site=self.name, **fields)

    def event(self, job_id: str, kind: str, reasons: list[str], **extra: Any) -> None:
        self.events.append((job_id, kind, reasons))

    def audited(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit.path.read_text().splitlines() if self.audit.path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == event]

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def secure_rounds(site: FakeSite) -> SecureRounds:
    return SecureRounds(cast(Site, site), Verifier(site.name, KEY.public_key(), site.state))


def task(ks: dict[str, ShareKeys], rnd: int = 1) -> RoundTask:
    return RoundTask(kind="train", job_id=JOB, round=rnd, model_sha256="0" * 64, deadline=time.time() + 60,
                     share_keys=task_keys(ks), issued_at=time.time(), expires_at=time.time() + 60,
                     nonce=secrets.token_hex(16))


def serve(gate: ScriptedAggregator, bundles: dict[str, ShareBundle], survivors: list[str], dropped: list[str],
          frozen: MaskRoster | None = None, box: dict[str, str] | None = None,
          key: Ed25519PrivateKey = KEY) -> UnmaskRequest:
    """Put the signed roster and B's unmask work for this split where the gate serves them."""
    gate.roster = sign(frozen or roster(bundles), KEY)
    req = request(survivors, dropped)
    gate.work = UnmaskWork(request=sign(req, key).decode(), inbox=box if box is not None else inbox(bundles, B))
    return req


@pytest.fixture
def ks(tmp_path: Path) -> dict[str, ShareKeys]:
    # B's share keys come from the same file its FakeSite uses.
    return share_keys(tmp_path)


def test_the_never_both_rule_holds_across_a_restart_and_its_refusal_is_audited(
        tmp_path: Path, ks: dict[str, ShareKeys]) -> None:
    gate = ScriptedAggregator()
    bundles = {s: r.bundle() for s, r in rounds(ks).items()}
    serve(gate, bundles, [A, B, C], [D])
    site = FakeSite(tmp_path, gate)
    asyncio.run(secure_rounds(site).unmask(task(ks)))
    assert len(gate.reveals) == 1 and list(gate.reveals[0].mask_key_shares) == [D]
    assert sorted(gate.reveals[0].self_mask_shares) == [A, B, C]
    assert site.state.reveal_of(JOB, 1) == ([A, B, C], [D])
    assert site.count("fedsilo_agent_secagg_reveals_sent_total") == 1
    site.state.close()

    # Restarted: the aggregator now asks for A's mask key (A "dropped") after B revealed A's self-mask share.
    site = FakeSite(tmp_path, gate)
    serve(gate, bundles, [B, C, D], [A])
    asyncio.run(secure_rounds(site).unmask(task(ks)))
    assert len(gate.reveals) == 1  # nothing more left
    refused = site.audited("secagg_reveal_refused")
    assert len(refused) == 1 and refused[0]["round"] == 1 and "both kinds of share" in refused[0]["reason"]
    assert site.count("fedsilo_agent_secagg_refusals_total", what="reveal") == 1
    assert site.events and site.events[-1][1] == "error"
    assert site.state.reveal_of(JOB, 1) == ([A, B, C], [D])

    # The same split as before is answered again (a lost answer, a retried request): the same reveal.
    serve(gate, bundles, [A, B, C], [D])
    asyncio.run(secure_rounds(site).unmask(task(ks)))
    assert len(gate.reveals) == 2 and gate.reveals[1] == gate.reveals[0]


def test_a_replayed_share_is_left_out_and_audited(tmp_path: Path, ks: dict[str, ShareKeys]) -> None:
    gate = ScriptedAggregator()
    bundles = {s: r.bundle() for s, r in rounds(ks).items()}
    old = rounds(ks, rnd=2)[C].bundle()  # C's share from another round, replayed into round 1's inbox
    serve(gate, bundles, [A, B, C], [D], box={**inbox(bundles, B), C: old.shares[B]})
    site = FakeSite(tmp_path, gate)
    asyncio.run(secure_rounds(site).unmask(task(ks)))
    assert sorted(gate.reveals[0].self_mask_shares) == [A, B]
    refused = site.audited("secagg_share_refused")
    assert len(refused) == 1 and list(refused[0]["senders"]) == [C]
    assert site.count("fedsilo_agent_secagg_refusals_total", what="share") == 1


def test_an_unmask_request_signed_by_another_key_is_refused(tmp_path: Path, ks: dict[str, ShareKeys]) -> None:
    gate = ScriptedAggregator()
    bundles = {s: r.bundle() for s, r in rounds(ks).items()}
    serve(gate, bundles, [A, B, C], [D], key=Ed25519PrivateKey.generate())
    site = FakeSite(tmp_path, gate)
    asyncio.run(secure_rounds(site).unmask(task(ks)))
    assert gate.reveals == [] and site.state.reveal_of(JOB, 1) is None
    assert "bad signature" in site.audited("secagg_reveal_refused")[0]["reason"]


def test_a_site_not_in_the_roster_is_excluded(tmp_path: Path, ks: dict[str, ShareKeys]) -> None:
    gate = ScriptedAggregator()
    site = FakeSite(tmp_path, gate)
    job = ActiveJob(SPEC, cast(Any, SimpleNamespace(n_train=1)), site_plan())
    sr = secure_rounds(site)
    mine = asyncio.run(sr.share(task(ks), job))
    assert [b.site for b in gate.shares] == [B] and site.state.shared(JOB, 1) == mine.secure.mask_key
    assert mine.roster is None  # the scripted answer carries none: the masker asks for it
    others = {s: r.bundle() for s, r in rounds(ks).items() if s != B}
    gate.roster = sign(roster(others), KEY)
    with pytest.raises(ExcludedError, match="not in round 1's roster"):
        asyncio.run(sr.masker(task(ks), job, mine))
    with_b = roster({**others, B: gate.shares[0]})
    gate.roster = sign(with_b, Ed25519PrivateKey.generate())
    with pytest.raises(SecAggRefusedError, match="bad signature"):
        asyncio.run(sr.masker(task(ks), job, mine))
    gate.roster = sign(with_b, KEY)
    asyncio.run(sr.masker(task(ks), job, mine))  # in it, with its own key, signed by the aggregator: masks


def test_a_site_restarted_after_sharing_is_a_dropout_and_a_late_sharer_is_excluded(
        tmp_path: Path, ks: dict[str, ShareKeys]) -> None:
    gate = ScriptedAggregator()
    site = FakeSite(tmp_path, gate)
    job = ActiveJob(SPEC, cast(Any, SimpleNamespace(n_train=1)), site_plan())
    asyncio.run(secure_rounds(site).share(task(ks), job))
    site.state.close()
    restarted = FakeSite(tmp_path, gate)
    with pytest.raises(ExcludedError, match="restarted before uploading"):
        asyncio.run(secure_rounds(restarted).share(task(ks), job))
    gate.frozen_without_us = True
    with pytest.raises(ExcludedError, match="frozen before this site's shares arrived"):
        asyncio.run(secure_rounds(restarted).share(task(ks, rnd=2), job))


def test_the_gate_sends_secure_aggregation_messages_only_under_its_own_name(tmp_path: Path) -> None:
    pki = local_pki(tmp_path / "pki", ["cleveland"])
    issued = pki.issued("site", "cleveland")
    tls = TLSConfig(ca_file=pki.ca_cert, cert_file=issued.cert, key_file=issued.key)
    audit = AuditLog(tmp_path / "audit.log")
    ks = share_keys(tmp_path)
    bundle = rounds(ks)[B].bundle()  # hungary's, sent through cleveland's gate
    reveal = Reveal(job_id=JOB, round=1, site=B, self_mask_shares={}, mask_key_shares={})

    async def go() -> list[str]:
        link = MqttLink("x", BrokerConfig(port=1), lambda t, p: None, [])
        gate = EgressGate("cleveland", "https://127.0.0.1:1", tls, link,
                          EgressPolicy(allowed_endpoints=["127.0.0.1:1"]), audit)
        await gate.start()
        try:
            out = []
            for send in (gate.send_shares(bundle), gate.send_reveal(reveal)):
                with pytest.raises(EgressRefusedError) as exc:
                    await send
                out.append(str(exc.value))
            return out
        finally:
            await gate.close()

    assert asyncio.run(go()) == ["shares for another site", "a reveal for another site"]
    refused = [json.loads(line) for line in audit.path.read_text().splitlines()]
    assert [(e["what"], e["claimed"]) for e in refused] == [("secagg_shares", B), ("secagg_reveal", B)]
