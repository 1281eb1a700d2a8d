"""The private Mosquitto (`fedsilo.broker`) with the project's MQTT link (`federation.mqtt.MqttLink`):
delivery, retained messages, persistent sessions, reconnection after restarts and crashes, start-up
errors, TLS identities and ACLs.

Every wait is a poll with a deadline. A subscription is known to be active once the subscriber's own
"ready" ping comes back to it: Mosquitto handles one connection's packets in order, so the ping is
processed after the SUBSCRIBE that `MqttLink` sends on connect.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest

from federation.mqtt import MqttLink
from federation.transport import BrokerConfig, TLSConfig
from fedsilo import broker as broker_mod
from fedsilo.broker import BrokerError, BrokerTLS, MosquittoBroker, find_mosquitto
from fedsilo.certs import Pki
from tests.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

READY = b"__ready__"
_seq = itertools.count()


def config_for(b: MosquittoBroker, tls: TLSConfig | None = None) -> BrokerConfig:
    # Short backoff so reconnection is quick; paho doubles the delay from min to max on each failure.
    return BrokerConfig(host=b.host, port=b.port, tls=tls, keepalive_s=5, reconnect_min_s=0.1, reconnect_max_s=0.5)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 30.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


class Inbox:
    """A message handler that keeps what it receives (ready pings apart)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.pings: set[bytes] = set()

    def __call__(self, topic: str, payload: bytes) -> None:
        if payload.startswith(READY):
            self.pings.add(payload)
        else:
            self.got.append((topic, payload))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [p for t, p in self.got if topic is None or t == topic]


class Links:
    """Creates links on one broker and stops them all at the end, also when a test fails."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.links: list[MqttLink] = []
        self.connects: dict[str, int] = {}

    async def open(self, client_id: str, subscriptions: Iterable[str] = ()) -> tuple[MqttLink, Inbox]:
        inbox = Inbox()
        self.connects.setdefault(client_id, 0)

        def count() -> None:
            self.connects[client_id] += 1

        link = MqttLink(client_id, self.cfg, inbox, subscriptions, on_connect=count)
        self.links.append(link)
        await link.start()
        return link, inbox

    async def close(self) -> None:
        for link in reversed(self.links):
            await link.stop()
        self.links.clear()


async def ready(link: MqttLink, inbox: Inbox, topic: str, within: float = 5.0) -> None:
    """Wait until `link` is connected and its subscription covering `topic` is active on the broker."""
    await until(link.connected.is_set, within, "connection")
    ping = READY + str(next(_seq)).encode()
    link.publish(topic, ping)
    await until(lambda: ping in inbox.pings, within, f"subscription to {topic}")


def scenario_with_links(cfg: BrokerConfig, body: Callable[[Links], Coroutine[Any, Any, None]]) -> None:
    async def scenario() -> None:
        links = Links(cfg)
        try:
            await body(links)
        finally:
            await links.close()

    run(scenario)


# -- delivery -----------------------------------------------------------------------------------------------


def test_two_links_exchange_qos1_messages(session_broker: MosquittoBroker) -> None:
    base = uid("x")

    async def body(links: Links) -> None:
        a, a_in = await links.open(uid("a"), [f"{base}/to-a"])
        b, b_in = await links.open(uid("b"), [f"{base}/to-b"])
        await ready(a, a_in, f"{base}/to-a")
        await ready(b, b_in, f"{base}/to-b")
        a.publish(f"{base}/to-b", b"hello b")
        b.publish(f"{base}/to-a", b"hello a")
        await until(lambda: a_in.got == [(f"{base}/to-a", b"hello a")], what="a's message")
        await until(lambda: b_in.got == [(f"{base}/to-b", b"hello b")], what="b's message")
        assert a.bytes_received > 0 and b.bytes_sent > 0

    scenario_with_links(config_for(session_broker), body)


def test_retained_message_reaches_a_late_subscriber(session_broker: MosquittoBroker) -> None:
    topic = uid("status") + "/site"

    async def body(links: Links) -> None:
        pub, pub_in = await links.open(uid("pub"), [topic])
        await ready(pub, pub_in, topic)
        pub.publish(topic, b"not kept")
        pub.publish(topic, b"online", retain=True)
        await until(lambda: pub_in.payloads(topic) == [b"not kept", b"online"], what="the broker to have both")
        late, late_in = await links.open(uid("late"), [topic])
        await until(lambda: late_in.payloads(topic) == [b"online"], what="the retained message")
        # Only the retained message, and only once.
        await ready(late, late_in, topic)
        assert late_in.payloads(topic) == [b"online"]

    scenario_with_links(config_for(session_broker), body)


# -- restarts and persistent sessions -----------------------------------------------------------------------


def test_links_reconnect_by_themselves_after_a_broker_restart(broker: MosquittoBroker) -> None:
    async def body(links: Links) -> None:
        sub, sub_in = await links.open("sub", ["t/#"])
        pub, _ = await links.open("pub")
        await ready(sub, sub_in, "t/ready")
        await until(pub.connected.is_set, what="pub to connect")
        pub.publish("t/retained", b"kept", retain=True)
        pub.publish("t/live", b"before")
        await until(lambda: sub_in.payloads() == [b"kept", b"before"], what="messages before the restart")

        await asyncio.to_thread(broker.restart)
        await until(lambda: links.connects["sub"] == 2 and links.connects["pub"] == 2, what="both links to reconnect")
        pub.publish("t/live", b"after")
        await until(lambda: sub_in.payloads("t/live") == [b"before", b"after"], what="the message after the restart")

        # The retained message survived the restart (it was saved on SIGTERM and loaded again).
        _, late_in = await links.open("late", ["t/retained"])
        await until(lambda: late_in.payloads() == [b"kept"], what="the retained message after the restart")

    scenario_with_links(config_for(broker), body)


def test_queued_for_a_persistent_session_while_the_subscriber_is_away(broker: MosquittoBroker) -> None:
    cfg = config_for(broker)

    async def body(links: Links) -> None:
        sub, sub_in = await links.open("site-agent", ["jobs/site"])
        await ready(sub, sub_in, "jobs/site")
        await sub.stop()  # a clean DISCONNECT; clean_session=False keeps the session and its subscription

        pub, pub_in = await links.open("aggregator", ["jobs/#"])
        await ready(pub, pub_in, "jobs/ready")
        for n in range(3):
            pub.publish("jobs/site", f"offer {n}".encode())
        await until(lambda: len(pub_in.payloads("jobs/site")) == 3, what="the broker to take the offers")
        assert sub_in.got == []

        _, back_in = await links.open("site-agent", ["jobs/site"])  # same client id: same session
        await until(lambda: back_in.payloads() == [b"offer 0", b"offer 1", b"offer 2"], what="the queued offers")

    scenario_with_links(cfg, body)


def test_queued_messages_survive_a_broker_restart(broker: MosquittoBroker) -> None:
    async def body(links: Links) -> None:
        sub, sub_in = await links.open("site-agent", ["jobs/site"])
        await ready(sub, sub_in, "jobs/site")
        await sub.stop()
        pub, pub_in = await links.open("aggregator", ["jobs/#"])
        await ready(pub, pub_in, "jobs/ready")
        pub.publish("jobs/site", b"queued")
        await until(lambda: pub_in.payloads("jobs/site") == [b"queued"], what="the broker to take the message")

        await asyncio.to_thread(broker.restart)

        _, back_in = await links.open("site-agent", ["jobs/site"])
        await until(lambda: back_in.payloads() == [b"queued"], what="the queued message after the restart")

    scenario_with_links(config_for(broker), body)


def test_state_saved_by_autosave_survives_a_crash(broker: MosquittoBroker) -> None:
    """`kill()` is a SIGKILL: only what autosave wrote survives. Wait for a save after the publish, crash,
    start again, and the retained message and the queued one are both there."""
    db = broker.workdir / "mosquitto.db"

    async def body(links: Links) -> None:
        sub, sub_in = await links.open("site-agent", ["jobs/site"])
        await ready(sub, sub_in, "jobs/site")
        await sub.stop()
        pub, pub_in = await links.open("aggregator", ["jobs/#"])
        await ready(pub, pub_in, "jobs/ready")
        pub.publish("jobs/site", b"queued")
        pub.publish("jobs/status", b"retained", retain=True)
        await until(lambda: len(pub_in.payloads()) == 2, what="the broker to take both messages")
        published = time.time()
        await until(lambda: db.exists() and db.stat().st_mtime > published, within=5, what="an autosave")
        await pub.stop()

        broker.kill()
        assert not broker.running
        await asyncio.to_thread(broker.start)

        _, back_in = await links.open("site-agent", ["jobs/site"])
        await until(lambda: back_in.payloads() == [b"queued"], what="the queued message after the crash")
        _, late_in = await links.open("late", ["jobs/status"])
        await until(lambda: late_in.payloads() == [b"retained"], what="the retained message after the crash")

    scenario_with_links(config_for(broker), body)


def test_a_link_started_while_the_broker_is_down_connects_when_it_comes_up(tmp_path: Path) -> None:
    b = MosquittoBroker(tmp_path / "late-broker")

    async def body(links: Links) -> None:
        link, inbox = await links.open("early", ["x"])
        await asyncio.sleep(0.5)  # paho is retrying with backoff meanwhile
        assert not link.connected.is_set()
        await asyncio.to_thread(b.start)
        await until(link.connected.is_set, within=5, what="the link to connect once the broker is up")
        await ready(link, inbox, "x")
        link.publish("x", b"hello")
        await until(lambda: inbox.payloads() == [b"hello"], what="the message")

    try:
        scenario_with_links(config_for(b), body)
    finally:
        b.stop()


def test_a_message_published_while_the_broker_is_down_is_sent_after_it_returns(broker: MosquittoBroker) -> None:
    """`MqttLink.publish` queues QoS 1 messages in paho while disconnected; they go out after reconnecting."""

    async def body(links: Links) -> None:
        sub, sub_in = await links.open("sub", ["t/#"])
        pub, _ = await links.open("pub")
        await ready(sub, sub_in, "t/ready")
        await until(pub.connected.is_set, what="pub to connect")
        await asyncio.to_thread(broker.stop)
        await until(lambda: not pub.connected.is_set(), what="pub to notice the broker is gone")
        pub.publish("t/update", b"sent while down")
        await asyncio.to_thread(broker.start)
        await until(lambda: sub_in.payloads() == [b"sent while down"], what="the message queued in paho")

    scenario_with_links(config_for(broker), body)


# -- the broker process itself ------------------------------------------------------------------------------


def test_config_file(tmp_path: Path) -> None:
    b = MosquittoBroker(tmp_path / "b", port=12345)
    text = b.config_text()
    assert "per_listener_settings true" in text
    assert "listener 12345 127.0.0.1" in text
    assert "allow_anonymous true" in text
    assert f"persistence_location {b.workdir}/" in text
    assert "autosave_interval 1" in text
    assert ("user root" in text) == (os.geteuid() == 0)
    assert b.url == "mqtt://127.0.0.1:12345"
    assert (b.host, b.port) == ("127.0.0.1", 12345)


def test_context_manager_stop_kill_and_restart_keep_the_port(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "b") as b:
        port = b.port
        assert b.running and b.pid is not None
        b.kill()
        assert not b.running
        b.start()
        b.restart()
        assert b.running and b.port == port
        with socket.create_connection((b.host, b.port), timeout=1):
            pass
        b.stop()
        b.stop()  # idempotent
    assert not b.running
    with pytest.raises(OSError):
        socket.create_connection((b.host, port), timeout=1).close()
    assert (tmp_path / "b" / "mosquitto.log").exists()


def test_start_fails_fast_with_the_log_when_mosquitto_exits(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    tls = BrokerTLS(cafile=missing / "ca.crt", certfile=missing / "b.crt", keyfile=missing / "b.key")
    b = MosquittoBroker(tmp_path / "b", tls=tls)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="exited with status") as err:
        b.start(timeout=10)
    assert time.monotonic() - started < 5
    assert "Error" in str(err.value)  # mosquitto's own complaint is in the message
    assert not b.running


def test_start_refuses_a_port_in_use(tmp_path: Path, free_port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port))
        s.listen()
        with pytest.raises(BrokerError, match="already in use"):
            MosquittoBroker(tmp_path / "b", port=free_port).start()


def test_find_mosquitto_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_mosquitto().name == "mosquitto"
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(broker_mod, "_SEARCH_PATHS", ())
    with pytest.raises(BrokerError, match="make install"):
        find_mosquitto()


# -- TLS and ACL --------------------------------------------------------------------------------------------


def test_tls_with_client_certificates_and_an_acl(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init()
    server = pki.issue("broker", "broker")
    alice, bob = pki.issue("site", "alice"), pki.issue("site", "bob")
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite t/alice/#\n\nuser bob\ntopic write t/#\n")
    b = MosquittoBroker(tmp_path / "b", tls=BrokerTLS(pki.ca_cert, server.cert, server.key), acl_file=acl)
    assert b.url.startswith("mqtts://")

    def tls(who: Path | None, key: Path | None) -> TLSConfig:
        return TLSConfig(ca_file=pki.ca_cert, cert_file=who, key_file=key)

    async def scenario() -> None:
        a_links = Links(config_for(b, tls(alice.cert, alice.key)))
        b_links = Links(config_for(b, tls(bob.cert, bob.key)))
        anon_links = Links(config_for(b, tls(None, None)))
        try:
            a, a_in = await a_links.open("alice", ["t/#"])
            await ready(a, a_in, "t/alice/ready")
            pub, _ = await b_links.open("bob")
            await until(pub.connected.is_set, what="bob to connect")
            pub.publish("t/bob/secret", b"for bob only")  # alice may not read it: the broker drops it for her
            pub.publish("t/alice/job", b"for alice")
            await until(lambda: a_in.payloads() == [b"for alice"], what="alice's message")
            anon, _ = await anon_links.open("anonymous")
            await asyncio.sleep(1.0)  # a client without a certificate never gets in
            assert not anon.connected.is_set()
        finally:
            for links in (anon_links, b_links, a_links):
                await links.close()

    b.start()
    try:
        run(scenario)
    finally:
        b.stop()
