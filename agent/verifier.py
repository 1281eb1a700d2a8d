"""Checks every job offer and round task before the agent acts on it: signed by the pinned aggregator key,
addressed to this site on the right topic, not expired, not a replay of an older message.

A message identical to the last one accepted for its job passes again: retained messages are re-delivered
after every reconnect, and the agent's handling of them is idempotent.

Secure aggregation's signed roster and unmask request (fetched over HTTP, not MQTT) are checked here too: signed by
the same key, for the job and round the site asked about."""

from __future__ import annotations

import time
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from agent.state import AgentState
from federation import topics
from federation.messages import JobOffer, RoundTask
from federation.secagg.messages import MaskRoster, UnmaskRequest
from federation.signing import SignatureError, verify

Signed = TypeVar("Signed", MaskRoster, UnmaskRequest)


class MessageRefusedError(Exception):
    def __init__(self, reason: str, job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.job_id = reason, job_id


class Verifier:
    def __init__(self, site: str, public_key: Ed25519PublicKey, state: AgentState) -> None:
        self._site, self._key, self._state = site, public_key, state

    def check(self, topic: str, payload: bytes, now: float | None = None) -> JobOffer | RoundTask:
        now = time.time() if now is None else now
        parts = topic.split("/")
        topic_job = parts[-1] if len(parts) == 6 else None
        try:
            fields = verify(payload, self._key)
        except SignatureError as exc:
            raise MessageRefusedError(f"refused a message on {topic}: {exc}", topic_job) from None
        msg: JobOffer | RoundTask
        try:
            msg = JobOffer.model_validate(fields) if fields.get("kind") == "offer" else RoundTask.model_validate(fields)
        except ValidationError as exc:
            raise MessageRefusedError(f"refused a malformed signed message: {str(exc)[:300]}", topic_job) from None
        channel = "offer" if isinstance(msg, JobOffer) else "task"
        expected = (topics.offers if channel == "offer" else topics.tasks)(self._site, msg.job_id)
        if topic != expected:
            raise MessageRefusedError(f"a signed {channel} for {msg.job_id} arrived on {topic}, not {expected}",
                                      msg.job_id)
        closing = isinstance(msg, RoundTask) and msg.kind == "closed"
        if not closing and now > msg.expires_at:
            raise MessageRefusedError(f"expired {channel} for {msg.job_id} (expired {now - msg.expires_at:.0f}s ago)",
                                      msg.job_id)
        last = self._state.last_seen(msg.job_id, channel)
        if last is not None:
            if last[1] == msg.nonce:
                # The same message again (a retained message after a reconnect or restart). Handling it is
                # idempotent, and it must be handled: the agent may have died before finishing it.
                return msg
            if msg.issued_at < last[0]:
                raise MessageRefusedError(
                    f"replayed {channel} for {msg.job_id}: older than one already accepted", msg.job_id)
        self._state.mark_seen(msg.job_id, channel, msg.issued_at, msg.nonce)
        return msg

    def roster(self, data: bytes, job_id: str, rnd: int) -> MaskRoster:
        """A secure round's signed roster, as `GET …/secagg/roster` returned it."""
        return self._signed(MaskRoster, data, job_id, rnd)

    def unmask_request(self, text: str, job_id: str, rnd: int) -> UnmaskRequest:
        """The signed request inside `UnmaskWork.request`."""
        return self._signed(UnmaskRequest, text.encode(), job_id, rnd)

    def _signed(self, model: type[Signed], data: bytes, job_id: str, rnd: int) -> Signed:
        what = model.__name__
        try:
            msg = model.model_validate(verify(data, self._key))
        except SignatureError as exc:
            raise MessageRefusedError(f"refused a {what} for {job_id} round {rnd}: {exc}", job_id) from None
        except ValidationError as exc:
            raise MessageRefusedError(f"refused a malformed signed {what}: {str(exc)[:300]}", job_id) from None
        if (msg.job_id, msg.round) != (job_id, rnd):
            raise MessageRefusedError(f"a signed {what} for {msg.job_id} round {msg.round} was served for {job_id} "
                                      f"round {rnd}", job_id)
        return msg
