"""The hospital's trust boundary, attacked from outside and from a participant: certificates, topic ACLs,
forged and replayed jobs, policy refusals, the budget across a crash, and the audit log.

`probe` uses the aggregator's broker identity to read and publish what an attacker with that access could;
`mallory` is a legitimate site certificate used against other sites.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.data import load_site_data
from agent.record_plan import record_plan
from federation import topics
from federation.jobs import JobSpec
from federation.messages import JobOffer, RoundTask, SiteEvent, canonical_json, update_path
from federation.mqtt import MqttLink
from federation.signing import load_private_key, sign
from federation.transport import BrokerConfig, TLSConfig
from fedsilo.certs import local_pki
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.calls import https
from tests.waiting import wait_round

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SITES = ("cleveland", "hungary")


def job_yaml(**overrides: Any) -> str:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update({"sites": list(SITES), "min_sites": 2, **overrides})
    return yaml.safe_dump(data)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("trust")
    files = split_by_center(root / "data")
    policies = {s: example_policy(s, {"heart-disease": files[s]}) for s in SITES}
    for p in policies.values():
        p["operations"]["max_concurrent_jobs"] = 5
    with LocalFederation(root, policies, extra_identities=("mallory",), heartbeat_s=1.0) as f:
        yield f


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSConfig:
    """A certificate named `cleveland`, from a CA the federation does not trust."""
    pki = local_pki(tmp_path_factory.mktemp("rogue"), ["cleveland"])
    issued = pki.issued("site", "cleveland")
    return TLSConfig(ca_file=pki.ca_cert, cert_file=issued.cert, key_file=issued.key)


class Listener:
    """An MQTT client under some identity, collecting what it receives."""

    def __init__(self, fed: LocalFederation, name: str, tls: TLSConfig, subscriptions: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        broker = BrokerConfig(port=fed.broker.port, tls=tls, reconnect_min_s=0.2, reconnect_max_s=1.0)
        self.link = MqttLink(name, broker, lambda t, p: self.got.append((t, p)), subscriptions)

    async def __aenter__(self) -> Listener:
        await self.link.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.link.stop()

    async def connected(self, within: float) -> bool:
        try:
            await asyncio.wait_for(self.link.connected.wait(), within)
            return True
        except TimeoutError:
            return False

    async def wait_for(self, pred: Any, within: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            hits = [x for x in self.got if pred(x)]
            if hits:
                return hits
            await asyncio.sleep(0.05)
        return []


def probe_tls(fed: LocalFederation) -> TLSConfig:
    return fed.tls("aggregator", "aggregator")


# ---------------------------------------------------------------- identity and transport
def test_broker_refuses_clients_without_a_federation_certificate(fed: LocalFederation, other_ca: TLSConfig) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        no_cert = TLSConfig(ca_file=fed.pki.ca_cert)
        rogue = TLSConfig(ca_file=fed.pki.ca_cert, cert_file=other_ca.cert_file, key_file=other_ca.key_file)
        async with Listener(fed, "anon", no_cert, []) as a, Listener(fed, "rogue", rogue, []) as b, \
                Listener(fed, "real", fed.tls("site", "mallory"), []) as c:
            return await a.connected(3), await b.connected(3), await c.connected(10)

    anonymous, rogue, genuine = asyncio.run(scenario())
    assert (anonymous, rogue, genuine) == (False, False, True)


def test_a_site_can_neither_read_nor_write_another_sites_topics(fed: LocalFederation) -> None:
    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        spy_topics = [f"{topics.ROOT}/cleveland/#", topics.offers("+", "#"), topics.events("+")]
        async with Listener(fed, "mallory-spy", fed.tls("site", "mallory"), spy_topics) as spy, \
                Listener(fed, "probe", probe_tls(fed), [topics.events("cleveland")]) as probe:
            assert await spy.connected(10) and await probe.connected(10)
            job_id = await asyncio.to_thread(fed.client.submit, job_yaml(rounds=1))
            # mallory, a real site, tries to refuse the job on cleveland's behalf
            forged = SiteEvent(site="cleveland", job_id=job_id, kind="refused", reasons=["forged"], at=time.time())
            spy.link.publish(topics.events("cleveland"), canonical_json(forged))
            real = await probe.wait_for(lambda m: b'"accepted"' in m[1] and job_id.encode() in m[1])
            summary = await asyncio.to_thread(fed.wait_job, job_id, 120)
            assert summary["state"] == "finished", summary["reason"]
            return spy.got, real, [m for m in probe.got if b"forged" in m[1]]

    spied, real, forged_seen = asyncio.run(scenario())
    assert spied == []  # nothing of cleveland's, nor anyone's offers or events, reached mallory
    assert real  # cleveland's own answer went through
    assert forged_seen == []  # the broker dropped mallory's message on cleveland's topic


def test_aggregator_identifies_callers_only_by_certificate(fed: LocalFederation, other_ca: TLSConfig) -> None:
    anonymous = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    status, body = https(fed, update_path("any-job", 1), anonymous, b"x")
    assert (status, body["error"]) == (401, "no_identity")
    status, body = https(fed, "/api/v1/jobs", anonymous)
    assert (status, body["error"]) == (401, "no_identity")
    rogue = TLSConfig(ca_file=fed.pki.ca_cert, cert_file=other_ca.cert_file, key_file=other_ca.key_file)
    # The server refuses the certificate: under TLS 1.3 the client sees the connection dropped.
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        https(fed, update_path("any-job", 1), rogue.client_context(), b"x")
    site = fed.tls("site", "mallory").client_context()
    status, body = https(fed, "/api/v1/jobs", site)
    assert (status, body["error"]) == (403, "wrong_role")
    status, _ = https(fed, "/healthz", anonymous)
    assert status == 200


# ---------------------------------------------------------------- signed jobs
def test_agent_refuses_unsigned_forged_tampered_expired_and_replayed_messages(fed: LocalFederation) -> None:
    spec = JobSpec.from_yaml(job_yaml(rounds=1))
    real_key = load_private_key(fed.pki.signing_key)
    rogue_key = Ed25519PrivateKey.generate()
    now = time.time()

    def offer(job: str, issued: float = now, ttl: float = 60) -> JobOffer:
        return JobOffer(job_id=job, spec=spec, requester="mallory", issued_at=issued, expires_at=issued + ttl,
                        nonce=job.encode().hex()[:32].ljust(32, "0"))

    tampered = json.loads(sign(offer("forged-tampered"), real_key))
    tampered["message"]["requester"] = "someone-else"
    def task(rnd: int, issued: float, n: str) -> RoundTask:
        return RoundTask(kind="train", job_id="forged-replay", round=rnd, model_sha256="0" * 64,
                         deadline=issued + 60, issued_at=issued, expires_at=issued + 60, nonce=n * 32)

    cases = {
        "forged-unsigned": (topics.offers("cleveland", "forged-unsigned"), canonical_json(offer("forged-unsigned"))),
        "forged-rogue": (topics.offers("cleveland", "forged-rogue"), sign(offer("forged-rogue"), rogue_key)),
        "forged-tampered": (topics.offers("cleveland", "forged-tampered"), json.dumps(tampered).encode()),
        "forged-expired": (topics.offers("cleveland", "forged-expired"),
                           sign(offer("forged-expired", issued=now - 600), real_key)),
    }
    expected = {"forged-unsigned": "unsigned", "forged-rogue": "bad signature", "forged-tampered": "bad signature",
                "forged-expired": "expired", "forged-replay": "replayed"}

    async def scenario() -> dict[str, list[str]]:
        async with Listener(fed, "probe2", probe_tls(fed), [topics.events("cleveland")]) as probe:
            assert await probe.connected(10)
            for topic, payload in cases.values():
                probe.link.publish(topic, payload)
            # replay: a newer task, then the older one again
            t_topic = topics.tasks("cleveland", "forged-replay")
            probe.link.publish(t_topic, sign(task(2, now, "b"), real_key))
            await asyncio.sleep(0.5)
            probe.link.publish(t_topic, sign(task(1, now - 5, "a"), real_key))
            out: dict[str, list[str]] = {}
            for job in expected:
                hits = await probe.wait_for(lambda m, j=job: j.encode() in m[1] and b'"error"' in m[1])
                out[job] = [r for h in hits for r in json.loads(h[1])["reasons"]]
            return out

    reasons = asyncio.run(scenario())
    for job, word in expected.items():
        assert any(word in r for r in reasons[job]), (job, reasons[job])
    assert fed.agents["cleveland"].poll() is None  # and the agent is still up
    audit = [json.loads(line) for line in (fed.workdir / "state/agent-cleveland/audit.log").read_text().splitlines()]
    refused = {e["job_id"] for e in audit if e["event"] == "message_refused"}
    assert set(expected) <= refused


# ---------------------------------------------------------------- policy, budget, audit
def test_a_job_outside_policy_is_refused_with_every_reason_and_audited(fed: LocalFederation) -> None:
    bad = yaml.safe_load(job_yaml(rounds=1))
    bad["privacy"] = {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.1}  # below both sites' floor of 0.3
    bad["metrics"] = ["auc", "age"]  # a raw column asked for as a "metric"
    bad["purpose"] = "marketing"
    job_id = fed.client.submit(yaml.safe_dump(bad))
    summary = fed.wait_job(job_id, timeout=60)
    assert summary["state"] == "failed"
    for site in SITES:
        reasons = " | ".join(summary["sites"][site]["reasons"])
        assert "purpose 'marketing' is not allowed" in reasons
        assert "below this site's floor 0.3" in reasons
        assert "metric(s) not allowed to leave: ['age']" in reasons
    entries = [json.loads(line) for line in (fed.workdir / "state/agent-hungary/audit.log").read_text().splitlines()]
    decision = next(e for e in entries if e.get("job_id") == job_id)
    assert decision["decision"] == "refused" and decision["requester"] == "operator"
    assert decision["epsilon_after"] == decision["epsilon_before"]


def test_spend_survives_a_crash_between_ledger_write_and_upload(fed: LocalFederation) -> None:
    fed.stop_agent("hungary")
    fed.start_agent("hungary", env={"FEDSILO_FAILPOINT": "released_before_upload"})
    fed.wait_sites_online(["hungary"])
    job_id = fed.client.submit(job_yaml(rounds=3, round_deadline_s=60))
    proc = fed.agents["hungary"]
    assert proc.wait(timeout=60) == 86  # died right after logging its first release, before sending it
    fed.agents.pop("hungary")
    fed.start_agent("hungary")
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert all(h["sites_reporting"] == 2 for h in summary["history"][1:])
    # exactly three releases were accounted, per patient record: none lost in the crash, none released twice
    spec = JobSpec.from_yaml(job_yaml(rounds=3))
    policy = yaml.safe_load((fed.workdir / "config" / "policy-hungary.yaml").read_text())
    data = load_site_data(Path(policy["datasets"]["heart-disease"]["path"]), spec.features, spec.dataset)
    per_patient = record_plan(spec, data.n_train).epsilon(3)
    hungary = summary["sites"]["hungary"]
    assert hungary["epsilon_unit"] == "record" and hungary["epsilon"] == pytest.approx(per_patient, rel=1e-9)
    assert hungary["epsilon_by_unit"] == {"record": pytest.approx(per_patient, rel=1e-9)}
    # The agent's own ledger, per unit: the per-patient one holds this job's spend, the per-site one none of it.
    agent = urllib.request.urlopen(f"http://127.0.0.1:{fed.status_ports['hungary']}/metrics", timeout=5).read()
    spent = {m.group(1): float(m.group(2)) for m in re.finditer(
        rb'fedsilo_agent_epsilon_spent\{dataset="heart-disease",unit="(\w+)"\} (\S+)', agent)}
    assert spent[b"site"] == 0.0 and spent[b"record"] >= per_patient


def test_a_job_pushed_past_its_plan_is_stopped_by_the_site(fed: LocalFederation) -> None:
    job_id = fed.client.submit(job_yaml(rounds=3, round_deadline_s=60))
    real_key = load_private_key(fed.pki.signing_key)

    async def scenario() -> list[Any]:
        async with Listener(fed, "probe3", probe_tls(fed), [topics.events("cleveland")]) as probe:
            assert await probe.connected(10)
            await asyncio.to_thread(wait_round, fed, job_id, 1)
            now = time.time()
            extra = RoundTask(kind="train", job_id=job_id, round=7, model_sha256="0" * 64, deadline=now + 60,
                              issued_at=now, expires_at=now + 60, nonce="f" * 32)
            probe.link.publish(topics.tasks("cleveland", job_id), sign(extra, real_key))
            return await probe.wait_for(lambda m: job_id.encode() in m[1] and b'"stopped"' in m[1])

    stopped = asyncio.run(scenario())
    assert stopped and "past the job's plan" in json.loads(stopped[0][1])["reasons"][0]


def test_audit_log_verifies_and_detects_tampering(fed: LocalFederation, tmp_path: Path) -> None:
    state = fed.workdir / "state/agent-cleveland"
    cli = [sys.executable, "-m", "fedsilo", "audit", "verify"]
    ok = subprocess.run([*cli, str(state / "audit.log"), "--state", str(state / "agent.db")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    lines = (state / "audit.log").read_text().splitlines()
    assert len(lines) >= 3
    edited = tmp_path / "edited.log"
    entry = json.loads(lines[1])
    entry["decision"] = "accepted" if entry.get("decision") != "accepted" else "refused"
    edited.write_text("\n".join([lines[0], json.dumps(entry), *lines[2:]]) + "\n")
    deleted = tmp_path / "deleted.log"
    deleted.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    truncated = tmp_path / "truncated.log"
    shutil.copy(state / "audit.log", truncated)
    truncated.write_text("\n".join(lines[:-1]) + "\n")
    for path, word in ((edited, "edited"), (deleted, "missing"), (truncated, "removed from the end")):
        out = subprocess.run([*cli, str(path), "--state", str(state / "agent.db")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and word in out.stderr, (path.name, out.stderr)
