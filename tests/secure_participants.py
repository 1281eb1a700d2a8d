"""Participants of a secure-aggregation job driven by a test: real site certificates, the real broker and the
aggregator's real endpoints, the protocol's math from `federation.secagg`, and plaintext updates the test chooses,
so that what the aggregator computes can be checked exactly, and what a dishonest site sends can be chosen."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from federation import topics
from federation.messages import ENVELOPE_HEADER, RoundTask, SiteEvent, UpdateEnvelope, canonical_json, update_path
from federation.mqtt import MqttLink
from federation.secagg import keys, masking, shamir
from federation.secagg.job import MASKED, mask_purpose, share_purpose
from federation.secagg.messages import (
    MaskRoster,
    Reveal,
    ShareBundle,
    UnmaskRequest,
    UnmaskWork,
    b64,
    reveal_path,
    roster_path,
    shares_path,
    unb64,
    unmask_path,
)
from federation.tensors import encode, sha256_hex
from federation.transport import BrokerConfig
from fedsilo.local import LocalFederation


class SecureParticipant:
    """One test-driven site: its per-job share key, and each round's mask key and self-mask seed."""

    def __init__(self, fed: LocalFederation, name: str) -> None:
        self.fed, self.name = fed, name
        self.share_private = keys.new_private_key()
        self.tasks: dict[int, RoundTask] = {}
        self.mask_private: dict[int, bytes] = {}
        self.seed: dict[int, bytes] = {}
        self.link: MqttLink | None = None

    # ---------------------------------------------------------------- MQTT
    async def accept(self, job_id: str) -> None:
        def on_message(topic: str, payload: bytes) -> None:
            if "/tasks/" in topic and payload:
                task = RoundTask.model_validate(json.loads(payload)["message"])
                self.tasks[task.round] = task

        broker = BrokerConfig(port=self.fed.broker.port, tls=self.fed.tls("site", self.name))
        self.link = MqttLink(self.name, broker, on_message, [topics.tasks(self.name)])
        await self.link.start()
        await asyncio.wait_for(self.link.connected.wait(), 10)
        self.link.publish(topics.events(self.name), canonical_json(SiteEvent(
            site=self.name, job_id=job_id, kind="accepted", share_key=b64(keys.public_key(self.share_private)),
            at=time.time())))

    async def task(self, rnd: int, within: float = 30) -> RoundTask:
        deadline = time.monotonic() + within
        while rnd not in self.tasks or self.tasks[rnd].kind != "train":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no task for round {rnd}")
            await asyncio.sleep(0.02)
        return self.tasks[rnd]

    async def leave(self) -> None:
        if self.link is not None:
            await self.link.stop()

    # ---------------------------------------------------------------- protocol
    def bundle(self, task: RoundTask, threshold: int, num_samples: int = 10) -> ShareBundle:
        assert task.share_keys is not None
        rnd = task.round
        self.mask_private[rnd], self.seed[rnd] = keys.new_private_key(), os.urandom(32)
        participants = sorted(task.share_keys)
        key_shares = shamir.split(self.mask_private[rnd], threshold, len(participants))
        seed_shares = shamir.split(self.seed[rnd], threshold, len(participants))
        sealed = {
            p: b64(keys.seal(keys.agree(self.share_private, unb64(task.share_keys[p]), share_purpose(task.job_id)),
                             key_shares[i] + seed_shares[i], keys.share_ad(task.job_id, rnd, self.name, p)))
            for i, p in enumerate(participants)
        }
        return ShareBundle(job_id=task.job_id, round=rnd, site=self.name,
                           mask_key=b64(keys.public_key(self.mask_private[rnd])), num_samples=num_samples,
                           seed_commitment=sha256_hex(self.seed[rnd]), shares=sealed)

    def mask(self, roster: MaskRoster, values: np.ndarray) -> np.ndarray:
        rnd = roster.round
        seeds = {p: keys.agree(self.mask_private[rnd], unb64(k), mask_purpose(roster.job_id, rnd))
                 for p, k in roster.mask_keys.items() if p != self.name}
        return masking.mask(values, self.seed[rnd], seeds, self.name)

    def reveal(self, work: UnmaskWork, share_keys: dict[str, str]) -> Reveal:
        request = UnmaskRequest.model_validate(json.loads(work.request)["message"])
        opened: dict[str, tuple[bytes, bytes]] = {}
        for sender, blob in work.inbox.items():
            plain = keys.open_sealed(
                keys.agree(self.share_private, unb64(share_keys[sender]), share_purpose(request.job_id)),
                unb64(blob), keys.share_ad(request.job_id, request.round, sender, self.name))
            half = len(plain) // 2
            opened[sender] = (plain[:half], plain[half:])
        return Reveal(job_id=request.job_id, round=request.round, site=self.name,
                      self_mask_shares={s: b64(opened[s][1]) for s in request.survivors},
                      mask_key_shares={s: b64(opened[s][0]) for s in request.dropped})

    # ---------------------------------------------------------------- HTTP (mutual TLS as this site)
    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.fed.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=40, context=self.fed.tls("site", self.name).client_context()) \
                    as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post_bundle(self, b: ShareBundle) -> tuple[int, Any]:
        status, body = self.call("POST", shares_path(b.job_id, b.round), b.model_dump_json().encode())
        return status, json.loads(body)

    def roster(self, job_id: str, rnd: int, wait: float = 20) -> MaskRoster:
        status, body = self.call("GET", roster_path(job_id, rnd) + f"?wait={wait}")
        assert status == 200, (status, body)
        return MaskRoster.model_validate(json.loads(body)["message"])

    def upload(self, job_id: str, rnd: int, masked: np.ndarray, num_samples: int = 10) -> tuple[int, Any]:
        payload = encode({MASKED: masked.astype(np.int64)})
        env = UpdateEnvelope(job_id=job_id, round=rnd, site=self.name, num_samples=num_samples,
                             sha256=sha256_hex(payload), evaluation=None, train_loss=0.5, epsilon=None)
        status, body = self.call("POST", update_path(job_id, rnd), payload,
                                 {ENVELOPE_HEADER: env.model_dump_json()})
        return status, json.loads(body)

    def unmask_work(self, job_id: str, rnd: int, wait: float = 20) -> tuple[int, Any]:
        status, body = self.call("GET", unmask_path(job_id, rnd) + f"?wait={wait}")
        return status, (UnmaskWork.model_validate_json(body) if status == 200 else json.loads(body))

    def post_reveal(self, r: Reveal | dict[str, Any]) -> tuple[int, Any]:
        data = r.model_dump_json().encode() if isinstance(r, Reveal) else json.dumps(r).encode()
        job_id, rnd = (r.job_id, r.round) if isinstance(r, Reveal) else (r["job_id"], r["round"])
        status, body = self.call("POST", reveal_path(job_id, rnd), data)
        return status, json.loads(body)
