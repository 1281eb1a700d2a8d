"""Participants of a secure-aggregation job driven by a test: real site certificates, the real broker and the
aggregator's real endpoints, the protocol's math from `federation.secagg` (through `bench.secagg_site`, which the
scale benchmark's simulated sites run too), and plaintext updates the test chooses, so that what the aggregator
computes can be checked exactly, and what a dishonest site sends can be chosen."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from bench.secagg_site import SecureSite, masked_upload
from federation import topics
from federation.messages import ENVELOPE_HEADER, RoundTask, SiteEvent, canonical_json, update_path
from federation.mqtt import MqttLink
from federation.secagg.messages import (
    MaskRoster,
    Reveal,
    ShareBundle,
    UnmaskWork,
    reveal_path,
    roster_path,
    shares_path,
    unmask_path,
)
from federation.transport import BrokerConfig
from fedsilo.local import LocalFederation


class SecureParticipant(SecureSite):
    """One test-driven site: `SecureSite`'s keys and messages, sent over MQTT and mutual TLS as this site."""

    def __init__(self, fed: LocalFederation, name: str) -> None:
        super().__init__(name)
        self.fed = fed
        self.tasks: dict[int, RoundTask] = {}
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
            site=self.name, job_id=job_id, kind="accepted", share_key=self.share_key, at=time.time())))

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

    def post_bundle(self, b: ShareBundle, wait: float = 0) -> tuple[int, Any]:
        """With `wait`, the answer waits that long for the roster and carries it once frozen."""
        query = f"?wait={wait}" if wait else ""
        status, body = self.call("POST", shares_path(b.job_id, b.round) + query, b.model_dump_json().encode())
        return status, json.loads(body)

    def roster(self, job_id: str, rnd: int, wait: float = 20) -> MaskRoster:
        status, body = self.call("GET", roster_path(job_id, rnd) + f"?wait={wait}")
        assert status == 200, (status, body)
        return MaskRoster.model_validate(json.loads(body)["message"])

    def upload(self, job_id: str, rnd: int, masked: np.ndarray, num_samples: int = 10) -> tuple[int, Any]:
        payload, env = masked_upload(job_id, rnd, self.name, masked, num_samples)
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
