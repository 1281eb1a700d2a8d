"""Signed jobs: the agent acts only on offers and tasks signed by the pinned key, for this site, on the
right topic, unexpired, and not older than what it already accepted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.state import AgentState
from agent.verifier import MessageRefusedError, Verifier
from federation import topics
from federation.jobs import JobSpec
from federation.messages import JobOffer, RoundTask, canonical_json
from federation.signing import SignatureError, sign, verify

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SPEC = JobSpec.from_yaml(EXAMPLE.read_text())
KEY = ed25519.Ed25519PrivateKey.generate()


def offer(job: str = "job-1", issued: float | None = None, ttl: float = 60, nonce: str = "a" * 32) -> JobOffer:
    now = time.time() if issued is None else issued
    return JobOffer(job_id=job, spec=SPEC, requester="op", issued_at=now, expires_at=now + ttl, nonce=nonce)


def task(rnd: int, issued: float, nonce: str, kind: str = "train") -> RoundTask:
    return RoundTask(kind=kind, job_id="job-1", round=rnd, model_sha256="0" * 64,  # type: ignore[arg-type]
                     deadline=issued + 60, issued_at=issued, expires_at=issued + 60, nonce=nonce)


def test_sign_and_verify_round_trip() -> None:
    data = sign(offer(), KEY)
    assert JobOffer.model_validate(verify(data, KEY.public_key())) == offer().model_copy(
        update={"issued_at": json.loads(data)["message"]["issued_at"],
                "expires_at": json.loads(data)["message"]["expires_at"]})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: {**d, "message": {**d["message"], "requester": "mallory"}}, "bad signature"),
        (lambda d: {"message": d["message"]}, "unsigned"),
        (lambda d: {**d, "signature": "!!"}, "bad signature"),
    ],
)
def test_tampered_or_unsigned_messages_fail(mutate: object, message: str) -> None:
    d = json.loads(sign(offer(), KEY))
    with pytest.raises(SignatureError, match=message):
        verify(json.dumps(mutate(d)).encode(), KEY.public_key())  # type: ignore[operator]


def test_another_key_fails() -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError):
        verify(sign(offer(), other), KEY.public_key())


@pytest.fixture
def verifier(tmp_path: Path) -> Verifier:
    return Verifier("cleveland", KEY.public_key(), AgentState(tmp_path / "a.db"))


def refused(v: Verifier, topic: str, data: bytes) -> str:
    with pytest.raises(MessageRefusedError) as exc:
        v.check(topic, data)
    return exc.value.reason


def test_verifier_accepts_a_good_offer_and_its_redelivery(verifier: Verifier) -> None:
    data = sign(offer(), KEY)
    topic = topics.offers("cleveland", "job-1")
    assert isinstance(verifier.check(topic, data), JobOffer)
    assert isinstance(verifier.check(topic, data), JobOffer)  # a retained message after a reconnect


def test_verifier_refusals(verifier: Verifier) -> None:
    t_offers = topics.offers("cleveland", "job-1")
    assert "unsigned" in refused(verifier, t_offers, canonical_json(offer()))
    assert "expired" in refused(verifier, t_offers, sign(offer(issued=time.time() - 120), KEY))
    assert "arrived on" in refused(verifier, topics.offers("hungary", "job-1"), sign(offer(), KEY))
    assert "arrived on" in refused(verifier, topics.offers("cleveland", "job-2"), sign(offer(), KEY))
    other = ed25519.Ed25519PrivateKey.generate()
    assert "bad signature" in refused(verifier, t_offers, sign(offer(), other))


def test_verifier_refuses_a_replayed_older_task(verifier: Verifier) -> None:
    t_tasks = topics.tasks("cleveland", "job-1")
    now = time.time()
    old, new = sign(task(1, now - 5, "1" * 32), KEY), sign(task(2, now, "2" * 32), KEY)
    verifier.check(t_tasks, old)
    verifier.check(t_tasks, new)
    assert "replayed" in refused(verifier, t_tasks, old)


def test_a_late_closing_notice_is_still_honoured(verifier: Verifier) -> None:
    long_ago = time.time() - 10_000
    msg = verifier.check(topics.tasks("cleveland", "job-1"), sign(task(3, long_ago, "3" * 32, "closed"), KEY))
    assert isinstance(msg, RoundTask) and msg.kind == "closed"
