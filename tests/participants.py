"""A participant driven by a test instead of an agent: it holds a real site certificate, accepts jobs over the
real broker and uploads whatever the test hands it over mutual TLS (bad, poisoned or late updates)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

from federation import topics
from federation.messages import (
    ENVELOPE_HEADER,
    RoundTask,
    SiteEvent,
    UpdateEnvelope,
    blob_path,
    canonical_json,
    update_path,
)
from federation.mqtt import MqttLink
from federation.transport import BrokerConfig
from fedsilo.local import LocalFederation


def post_update(fed: LocalFederation, as_site: str, env: UpdateEnvelope, body: bytes) -> tuple[int, dict[str, Any]]:
    """Upload over mutual TLS with `as_site`'s certificate."""
    req = urllib.request.Request(fed.url + update_path(env.job_id, env.round), data=body, method="POST")
    req.add_header(ENVELOPE_HEADER, env.model_dump_json())
    ctx = fed.tls("site", as_site).client_context()
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Mallory:
    """A participant driven by the test: accepts over MQTT and uploads whatever the test hands it."""

    def __init__(self, fed: LocalFederation) -> None:
        self.fed = fed
        self.tasks: list[RoundTask] = []

    async def join(self, job_id: str) -> MqttLink:
        def on_message(topic: str, payload: bytes) -> None:
            if "/tasks/" in topic and payload:
                self.tasks.append(RoundTask.model_validate(json.loads(payload)["message"]))

        broker = BrokerConfig(port=self.fed.broker.port, tls=self.fed.tls("site", "mallory"))
        link = MqttLink("mallory", broker, on_message, [topics.tasks("mallory")])
        await link.start()
        await asyncio.wait_for(link.connected.wait(), 10)
        link.publish(topics.events("mallory"), canonical_json(
            SiteEvent(site="mallory", job_id=job_id, kind="accepted", at=time.time())))
        return link

    async def wait_task(self, rnd: int, within: float = 30) -> RoundTask:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for t in self.tasks:
                if t.round == rnd:
                    return t
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no task for round {rnd}")


def fetch_blob(fed: LocalFederation, as_site: str, sha: str) -> bytes:
    """A global model, fetched as a participant does (mutual TLS with `as_site`'s certificate)."""
    ctx = fed.tls("site", as_site).client_context()
    with urllib.request.urlopen(fed.url + blob_path(sha), timeout=10, context=ctx) as resp:
        body: bytes = resp.read()
        return body
