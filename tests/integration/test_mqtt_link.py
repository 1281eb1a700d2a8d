"""The MQTT link against a real Mosquitto: delivery, retained messages, reconnection, queued delivery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from federation.mqtt import MqttLink
from federation.transport import BrokerConfig
from fedsilo.broker import MosquittoBroker
from tests.waiting import until

pytestmark = pytest.mark.integration
FAST = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "keepalive_s": 5}


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def test_delivery_retained_and_reconnect_after_broker_restart(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b")
    broker.start()
    cfg = BrokerConfig(port=broker.port, **FAST)  # type: ignore[arg-type]

    async def scenario() -> None:
        got: list[tuple[str, bytes]] = []
        sub = MqttLink("sub", cfg, lambda t, p: got.append((t, p)), ["t/#"])
        connects: list[int] = []
        pub = MqttLink("pub", cfg, lambda t, p: None, [], on_connect=lambda: connects.append(1))
        await pub.start()
        await until(pub.connected.is_set)
        pub.publish("t/retained", b"kept", retain=True)
        await asyncio.sleep(0.2)
        await sub.start()  # a late subscriber still gets the retained message
        await until(lambda: (("t/retained", b"kept") in got))
        pub.publish("t/live", b"one")
        await until(lambda: ("t/live", b"one") in got)
        await asyncio.to_thread(broker.restart)
        await until(lambda: len(connects) == 2)  # the link reconnected by itself
        await until(lambda: pub.connected.is_set() and sub.connected.is_set())
        pub.publish("t/live", b"two")
        await until(lambda: ("t/live", b"two") in got)
        await sub.stop()
        await pub.stop()

    try:
        run(scenario)
    finally:
        broker.stop()


def test_broker_down_at_start_then_up(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b")
    cfg = BrokerConfig(port=broker.port, **FAST)  # type: ignore[arg-type]

    async def scenario() -> None:
        got: list[bytes] = []
        link = MqttLink("early", cfg, lambda t, p: got.append(p), ["x"])
        await link.start()
        await asyncio.sleep(0.5)
        assert not link.connected.is_set()
        broker.start()
        await until(link.connected.is_set)
        link.publish("x", b"hello")
        await until(lambda: b"hello" in got)
        await link.stop()

    try:
        run(scenario)
    finally:
        broker.stop()


def test_messages_for_an_offline_persistent_client_are_queued(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b")
    broker.start()
    cfg = BrokerConfig(port=broker.port, **FAST)  # type: ignore[arg-type]

    async def scenario() -> None:
        got: list[bytes] = []
        sub = MqttLink("persistent-sub", cfg, lambda t, p: got.append(p), ["q"])
        await sub.start()
        await until(sub.connected.is_set)
        await sub.stop()
        pub = MqttLink("pub2", cfg, lambda t, p: None, [])
        await pub.start()
        await until(pub.connected.is_set)
        pub.publish("q", b"while-away")
        await asyncio.sleep(0.3)
        sub2 = MqttLink("persistent-sub", cfg, lambda t, p: got.append(p), ["q"])
        await sub2.start()
        await until(lambda: b"while-away" in got)
        await sub2.stop()
        await pub.stop()

    try:
        run(scenario)
    finally:
        broker.stop()
