"""Identities against a real Mosquitto and a real aggregator: a revoked site certificate is refused by the
aggregator at once (403, counted, no stored row) and by the broker once it rereads its CRL (restart; a SIGHUP
refuses new connections only); operator tokens revoked or expired in the operators file are refused (401 with the
reason) without a restart; the broker drops a message larger than `message_size_limit`."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.auth import OperatorToken, load_operators_file, write_operators_file
from federation.messages import update_path
from federation.transport import TLSConfig
from fedsilo.broker import MESSAGE_SIZE_LIMIT, BrokerTLS, MosquittoBroker
from fedsilo.certs import Pki
from fedsilo.cli import main
from fedsilo.local import LocalFederation
from tests.calls import https
from tests.integration.test_broker_config import connects

pytestmark = pytest.mark.integration


def entry(name: str, token: str, **extra: Any) -> OperatorToken:
    return OperatorToken.model_validate({"name": name, "role": "viewer",
                                         "token_sha256": hashlib.sha256(token.encode()).hexdigest(), **extra})


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A broker and an aggregator, no agents: `north` and `south` are site certificates played by the tests."""
    root = tmp_path_factory.mktemp("identities")
    operators = root / "operators.yaml"
    write_operators_file(operators, (entry("alice", "alice-token"),))
    with LocalFederation(root, {}, extra_identities=("north", "south"),
                         aggregator_extra={"operators_file": str(operators)}) as f:
        yield f


def metric(fed: LocalFederation, line_start: str) -> float:
    text = bytes(fed.client.request("GET", "/metrics")).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


class Live:
    """An MQTT connection under a site's identity that stays open."""

    def __init__(self, port: int, tls: TLSConfig) -> None:
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"live-{time.monotonic_ns()}")
        self.client.tls_set_context(tls.client_context())
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_revoked_site_is_refused_by_the_aggregator_at_once_and_by_the_broker_after_a_restart(
        fed: LocalFederation) -> None:
    north, south = fed.tls("site", "north"), fed.tls("site", "south")
    status, body = https(fed, update_path("no-such-job", 1), north.client_context(), b"x")
    assert status != 403 or body["error"] != "certificate_revoked"
    assert connects(fed.broker.port, north)
    live = Live(fed.broker.port, north)
    rows_before = len(fed.client.request("GET", "/api/v1/rejections"))
    refused_before = metric(fed, 'fedsilo_revoked_certificate_requests_total{role="site"}')

    out = cli("certs", "revoke", "north", "--dir", str(fed.pki.root))
    assert "revoked site north" in out

    # The aggregator: refused on the next request, on a new connection or not, without a restart.
    for _ in range(50):
        status, body = https(fed, update_path("no-such-job", 1), north.client_context(), b"x")
        assert (status, body["error"]) == (403, "certificate_revoked")
    assert "site 'north'" in body["detail"] and "revoked" in body["detail"]
    status, body = https(fed, "/api/v1/blobs/" + "0" * 64, north.client_context())
    assert (status, body["error"]) == (403, "certificate_revoked")
    status, body = https(fed, update_path("no-such-job", 1), south.client_context(), b"x")
    assert body["error"] != "certificate_revoked"  # another site is untouched
    assert metric(fed, 'fedsilo_revoked_certificate_requests_total{role="site"}') == refused_before + 51
    assert len(fed.client.request("GET", "/api/v1/rejections")) == rows_before  # counted, never a row each

    # Mosquitto 2.0.11: a SIGHUP rereads the CRL for new connections, but the revoked site's open connection stays.
    assert fed.broker.pid is not None
    os.kill(fed.broker.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while connects(fed.broker.port, north):
        assert time.monotonic() < deadline, "the broker still admits north after a SIGHUP"
    assert live.connected.is_set()
    # A restart drops every connection; north cannot come back, south can.
    fed.broker.restart()
    deadline = time.monotonic() + 10
    while live.connected.is_set():
        assert time.monotonic() < deadline, "north's connection survived the broker's restart"
        time.sleep(0.05)
    live.close()
    assert not connects(fed.broker.port, north)
    assert connects(fed.broker.port, south)

    # Issued again (--force), north gets a new serial and is admitted by both.
    cli("certs", "issue-site", "north", "--force", "--dir", str(fed.pki.root))
    north = fed.tls("site", "north")
    status, body = https(fed, update_path("no-such-job", 1), north.client_context(), b"x")
    assert body["error"] != "certificate_revoked"
    assert connects(fed.broker.port, north)


def test_operator_tokens_are_revoked_and_expire_without_a_restart(fed: LocalFederation) -> None:
    ctx = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    operators = fed.workdir / "operators.yaml"
    assert https(fed, "/api/v1/jobs", ctx, token="alice-token")[0] == 200
    out = cli("operator", "token", "bob", "--ttl", "1h", "--file", str(operators))
    bob = next(line for line in out.splitlines() if line.startswith("token ")).rsplit(" ", 1)[1]
    assert https(fed, "/api/v1/jobs", ctx, token=bob)[0] == 200  # added to the file: valid at once

    cli("operator", "revoke", "alice", "--file", str(operators))
    status, body = https(fed, "/api/v1/jobs", ctx, token="alice-token")
    assert (status, body["error"], body["detail"]) == (401, "token_revoked", "token revoked (operator 'alice')")

    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    tokens = tuple(t.model_copy(update={"expires_at": past}) if t.name == "bob" else t
                   for t in load_operators_file(operators))
    write_operators_file(operators, tokens)
    status, body = https(fed, "/api/v1/jobs", ctx, token=bob)
    assert (status, body["error"]) == (401, "token_expired") and "token expired at" in body["detail"]

    write_operators_file(operators, ())  # removed
    status, body = https(fed, "/api/v1/jobs", ctx, token=bob)
    assert (status, body["error"], body["detail"]) == (401, "unknown_token", "unknown token")
    status, body = https(fed, "/api/v1/jobs", ctx, token="never-issued")
    assert (status, body["error"]) == (401, "unknown_token")
    for reason, n in (("token_revoked", 1), ("token_expired", 1), ("unknown_token", 2)):
        assert metric(fed, f'fedsilo_operator_tokens_refused_total{{reason="{reason}"}}') == n
    # Tokens in the aggregator's own config (the console's) are untouched by the file.
    _, token = fed.tokens["ops-viewer"]
    assert https(fed, "/api/v1/jobs", ctx, token=token)[0] == 200


def test_the_broker_drops_a_message_over_its_size_limit(broker: MosquittoBroker) -> None:
    got: list[bytes] = []
    subscribed = threading.Event()

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
        c.connect(broker.host, broker.port)
        c.loop_start()
        return c

    sub = client("sub")
    sub.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.subscribe("t/#", qos=1)
    assert subscribed.wait(5)
    pub = client("pub")
    try:
        for payload in (b"a" * (MESSAGE_SIZE_LIMIT + 1), b"b" * MESSAGE_SIZE_LIMIT, b"c" * 2000,
                        b"d" * (4 * MESSAGE_SIZE_LIMIT), b"e"):
            pub.publish("t/x", payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while len(got) < 3:
            assert time.monotonic() < deadline, [len(p) for p in got]
            time.sleep(0.05)
        # The two oversize messages are dropped; the one at the limit, the small ones, and what follows, pass.
        assert [(p[:1], len(p)) for p in got] == [(b"b", MESSAGE_SIZE_LIMIT), (b"c", 2000), (b"e", 1)]
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def test_mosquitto_refuses_everyone_once_the_crl_is_past_its_next_update(tmp_path: Path) -> None:
    """Why `fedsilo certs crl` must re-sign the CRL before its next-update time (docs/identities.md)."""
    pki = Pki(tmp_path / "pki")
    pki.init()
    issued, north = pki.issue("broker", "broker"), pki.issue("site", "north")
    site = TLSConfig(ca_file=pki.ca_cert, cert_file=north.cert, key_file=north.key)
    broker = MosquittoBroker(tmp_path / "broker", tls=BrokerTLS(pki.ca_cert, issued.cert, issued.key,
                                                                crlfile=pki.crl))
    with broker:
        assert connects(broker.port, site)
    ca_key, ca_cert = pki._ca()
    now = dt.datetime.now(dt.UTC)
    stale = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
             .last_update(now - dt.timedelta(days=2)).next_update(now - dt.timedelta(days=1))
             .sign(ca_key, hashes.SHA256()))
    pki.crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    with broker:
        assert not connects(broker.port, site)
    pki.write_crl()
    with broker:
        assert connects(broker.port, site)
