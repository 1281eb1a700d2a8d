"""A job through the agent's own `Offers` and `Rounds` (real policy, data, training, ledger), with a scripted
aggregator: a noise-free job a policy permits is answered with no ε (not ∞); a secure job's accept carries the
share key (the same when repeated); a round shares, trains, masks and uploads,
then reveals in the background; a site left out of the roster releases and is charged nothing; a restart after the
upload still reveals, without training or sharing again."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.egress import EgressGate
from agent.offers import Offers
from agent.policy import SitePolicy
from agent.privacy import PrivacyEngine
from agent.privacy_policy import plan_privacy
from agent.rounds import Rounds
from agent.secagg import ShareKeys
from agent.site import ActiveJob, Site, load_data
from agent.state import AgentState
from agent.status_server import AgentMetrics
from agent.verifier import Verifier
from federation.messages import JobOffer, RoundTask
from federation.models import build_model, get_weights
from federation.secagg.messages import ShareBundle, UnmaskWork
from federation.signing import sign
from federation.tensors import decode, encode, sha256_hex
from federation.transport import TLSConfig
from fedsilo.datasets import split_by_center
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
)

ROOT = Path(__file__).resolve().parents[2]
ME = "hungary"
ENDPOINTS = ["agg:443", "mq:8883"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_by_center(tmp_path_factory.mktemp("data"))


def make_site(root: Path, gate: ScriptedAggregator, files: dict[str, Path]) -> Site:
    p = SitePolicy.load(ROOT / "policies" / "examples" / f"{ME}.yaml")
    ds = p.datasets["heart-disease"].model_copy(update={"path": files[ME]})
    policy = p.model_copy(update={"datasets": {"heart-disease": ds},
                                  "egress": p.egress.model_copy(update={"allowed_endpoints": ENDPOINTS})})
    cfg = AgentConfig(site=ME, policy_file=root / "policy.yaml", aggregator_public_key=root / "key.pem",
                      tls=TLSConfig(ca_file=root / "ca.pem"), state_dir=root / ME, status_port=None)
    state = AgentState(cfg.state_dir / "agent.db")
    return Site(cfg, policy, state, AuditLog(cfg.audit_log), cast(EgressGate, gate), AgentMetrics(),
                PrivacyEngine(state), ENDPOINTS)


def agent_rounds(site: Site) -> Rounds:
    return Rounds(site, Offers(site), Verifier(ME, KEY.public_key(), site.state))


def activate(site: Site) -> None:
    ds = site.policy.datasets["heart-disease"]
    data = load_data(ds, SPEC)
    site.jobs[JOB] = ActiveJob(SPEC, data, plan_privacy(SPEC, site.policy.privacy, data.n_train))


def train_task(ks: dict[str, ShareKeys], model: bytes) -> RoundTask:
    return RoundTask(kind="train", job_id=JOB, round=1, model_sha256=sha256_hex(model), deadline=time.time() + 120,
                     share_keys={s: k.public(JOB) for s, k in ks.items()}, issued_at=time.time(),
                     expires_at=time.time() + 120, nonce=secrets.token_hex(16))


class Peers(ScriptedAggregator):
    """The other three sites' bundles are in; the roster is frozen when this site's shares arrive (with it, or
    without it when `leave_out`), and the unmask work for a split is served at once."""

    def __init__(self, ks: dict[str, ShareKeys], model: bytes, leave_out: bool = False,
                 signer: Ed25519PrivateKey = KEY) -> None:
        super().__init__(model)
        self.bundles: dict[str, ShareBundle] = {s: r.bundle() for s, r in rounds(ks).items() if s != ME}
        self.leave_out = leave_out
        self.signer = signer

    async def send_shares(self, bundle: ShareBundle, wait: float = 0.0) -> bytes:
        await super().send_shares(bundle, wait)
        if not self.leave_out:
            self.bundles[ME] = bundle
        self.roster = sign(roster(self.bundles), self.signer)
        survivors = sorted(s for s in self.bundles if s != "va-long-beach")
        self.work = self.work_for(survivors, ["va-long-beach"])
        return self.shares_answer(wait)

    def work_for(self, survivors: list[str], dropped: list[str]) -> UnmaskWork:
        return UnmaskWork(request=sign(request(survivors, dropped), KEY).decode(), inbox=inbox(self.bundles, ME))


def global_model() -> bytes:
    return encode(get_weights(build_model("logreg", SPEC.features.input_dim())))


def audited(site: Site, event: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, site.audit.path.read_text().splitlines()) if e["event"] == event]


def test_accepting_a_secure_job_sends_the_same_share_key_every_time(tmp_path: Path,
                                                                    data_files: dict[str, Path]) -> None:
    gate = ScriptedAggregator()
    site = make_site(tmp_path, gate, data_files)
    offer = JobOffer(job_id=JOB, spec=SPEC, requester="operator", issued_at=time.time(),
                     expires_at=time.time() + 60, nonce=secrets.token_hex(16))
    asyncio.run(Offers(site).handle(offer))
    asyncio.run(Offers(site).handle(offer.model_copy(update={"nonce": secrets.token_hex(16)})))
    assert [e.kind for e in gate.events] == ["accepted", "accepted"], gate.events[0].reasons
    key = ShareKeys(tmp_path / ME / "secagg.key").public(JOB)
    assert [e.share_key for e in gate.events] == [key, key]
    site.state.close_job(JOB)  # this site runs one job at a time
    plain = SPEC.model_copy(update={"secure_aggregation": None})
    asyncio.run(Offers(site).handle(JobOffer(job_id="job-plain", spec=plain, requester="operator",
                                             issued_at=time.time(), expires_at=time.time() + 60,
                                             nonce=secrets.token_hex(16))))
    assert gate.events[-1].kind == "accepted" and gate.events[-1].share_key is None


def test_a_noise_free_job_that_the_policy_permits_is_answered_with_no_epsilon(tmp_path: Path,
                                                                             data_files: dict[str, Path]) -> None:
    gate = ScriptedAggregator()
    site = make_site(tmp_path, gate, data_files)
    site.policy = site.policy.model_copy(update={"privacy": site.policy.privacy.model_copy(update={
        "min_noise_multiplier": 0.0, "max_epsilon_per_job": float("inf"),
        "budgets": {"heart-disease": site.policy.privacy.budgets["heart-disease"].model_copy(
            update={"epsilon": float("inf")})}})})
    free = SPEC.model_copy(update={"secure_aggregation": None, "privacy": SPEC.privacy.model_copy(update={
        "unit": "site", "noise_multiplier": 0.0, "allow_no_noise": True, "record_clip_norm": None,
        "target_epsilon": None})})
    asyncio.run(Offers(site).handle(JobOffer(job_id="job-free", spec=free, requester="operator",
                                             issued_at=time.time(), expires_at=time.time() + 60,
                                             nonce=secrets.token_hex(16))))
    [answer] = gate.events
    assert (answer.kind, answer.epsilon_planned, answer.planned) == ("accepted", None, {}), answer.reasons
    assert "job-free" in site.jobs


@pytest.mark.parametrize("answer_roster", [False, True], ids=["roster-polled", "roster-with-the-shares-answer"])
def test_a_secure_round_shares_masks_uploads_and_reveals(tmp_path: Path, data_files: dict[str, Path],
                                                         answer_roster: bool) -> None:
    ks = share_keys(tmp_path)
    model = global_model()
    gate = Peers(ks, model)
    gate.answer_roster = answer_roster
    site = make_site(tmp_path, gate, data_files)
    activate(site)
    task = train_task(ks, model)

    async def go(r: Rounds) -> None:
        await r.handle(task)
        await r.secure.join()

    asyncio.run(go(agent_rounds(site)))
    assert [b.site for b in gate.shares] == [ME] and len(gate.updates) == 1
    up = gate.updates[0]
    masked = decode(up.payload)["masked"]
    assert masked.dtype.name == "int64" and masked.shape == (SPEC.features.input_dim() + 1,)
    assert masked.min() >= 0 and masked.max() < 2**32
    release = site.state.release(JOB, 1)
    assert release is not None and release.sent and release.payload == up.payload
    site_unit = next(u for u in up.envelope.privacy if u.unit == "site")
    assert site_unit.epsilon_alone is not None and site_unit.epsilon is not None
    assert site_unit.epsilon_alone > site_unit.epsilon
    assert site.state.job_spend(JOB) == {"site": pytest.approx(site_unit.epsilon)}
    assert len(gate.reveals) == 1 and list(gate.reveals[0].mask_key_shares) == ["va-long-beach"]
    assert site.state.reveal_of(JOB, 1) == ([s for s in SITES if s != "va-long-beach"], ["va-long-beach"])
    # The roster came with the shares' answer, or was asked for once; the unmask phase reused it.
    assert gate.roster_fetches == (0 if answer_roster else 1)
    site.state.close()

    # Restarted after the upload: the retained task brings the round back; the site reveals again (idempotent) and
    # neither trains, shares nor uploads again.
    site = make_site(tmp_path, gate, data_files)
    activate(site)
    asyncio.run(go(agent_rounds(site)))
    assert len(gate.shares) == 1 and len(gate.updates) == 1 and len(gate.reveals) == 2
    assert site.state.releases_for(JOB) == 1
    assert gate.roster_fetches == (1 if answer_roster else 2)  # a restarted site holds no roster: it asks


def one_round(root: Path, gate: Peers, files: dict[str, Path], ks: dict[str, ShareKeys], model: bytes) -> Site:
    """Round 1 at this site, the unmask phase included; the site, for its state and audit."""
    site = make_site(root, gate, files)
    activate(site)
    r = agent_rounds(site)

    async def go() -> None:
        await r.handle(train_task(ks, model))
        await r.secure.join()

    asyncio.run(go())
    return site


def test_a_site_left_out_of_the_roster_releases_and_is_charged_nothing(tmp_path: Path,
                                                                      data_files: dict[str, Path]) -> None:
    ks = share_keys(tmp_path)
    model = global_model()
    gate = Peers(ks, model, leave_out=True)
    site = one_round(tmp_path, gate, data_files, ks, model)
    assert gate.updates == [] and gate.reveals == []
    assert site.state.release(JOB, 1) is None and site.state.job_spend(JOB) == {}
    assert site.metrics.registry.get_sample_value("fedsilo_agent_rounds_not_released_total",
                                                  {"reason": "excluded"}) == 1
    entry = audited(site, "round_not_released")
    assert len(entry) == 1 and entry[0]["why"] == "excluded" and "not in round 1's roster" in entry[0]["reason"]
    assert gate.events[-1].kind == "error"


def test_a_roster_in_the_shares_answer_not_signed_by_the_aggregator_is_never_masked_against(
        tmp_path: Path, data_files: dict[str, Path]) -> None:
    ks = share_keys(tmp_path)
    model = global_model()
    gate = Peers(ks, model, signer=Ed25519PrivateKey.generate())
    gate.answer_roster = True
    site = one_round(tmp_path, gate, data_files, ks, model)
    assert gate.updates == [] and gate.reveals == [] and gate.roster_fetches == 0
    assert site.state.release(JOB, 1) is None and site.state.job_spend(JOB) == {}
    entry = audited(site, "round_not_released")
    assert len(entry) == 1 and entry[0]["why"] == "secagg_refused" and "signature" in entry[0]["reason"]
