"""`fedsilo broker config` writes a mosquitto.conf and ACL that a real Mosquitto starts from: it reads its 0600 key
(as the key's owner, root or not), takes a site's certificate and refuses a client without one."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from federation.transport import TLSConfig
from fedsilo.broker import acl_for, find_mosquitto
from fedsilo.certs import Pki
from fedsilo.cli import main

pytestmark = pytest.mark.integration


def connects(port: int, tls: TLSConfig) -> bool:
    """Whether the broker accepts an MQTT connection with this TLS identity (within 5 s)."""
    done, result = threading.Event(), {"ok": False}

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        result["ok"] = not getattr(rc, "is_failure", True)
        done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    client.tls_set_context(tls.client_context())
    client.on_connect = on_connect
    client.on_disconnect = lambda *_: done.set()
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return False
    client.loop_start()
    done.wait(5)
    client.loop_stop()
    client.disconnect()
    return result["ok"]


def test_mosquitto_runs_from_the_written_config(tmp_path: Path, free_port: int) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init()
    pki.issue("broker", "broker")
    north = pki.issue("site", "north")
    result = CliRunner().invoke(main, ["broker", "config", "--sites", "north,south", "--port", str(free_port),
                                       "--host", "127.0.0.1", "--dir", str(pki.root), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    conf = (tmp_path / "b" / "mosquitto.conf").read_text()
    assert conf.startswith(f"user {Path(pki.root / 'broker' / 'broker.key').owner()}\n")
    assert (tmp_path / "b" / "acl").read_text() == acl_for(["north", "south"])
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                 f"acl_file {tmp_path / 'b' / 'acl'}", f"listener {free_port} 127.0.0.1"):
        assert f"\n{line}\n" in conf
    site = TLSConfig(ca_file=pki.ca_cert, cert_file=north.cert, key_file=north.key)
    with (tmp_path / "mosquitto.out").open("wb") as out:  # its stdout log is block-buffered into a pipe or file
        proc = subprocess.Popen([str(find_mosquitto()), "-c", str(tmp_path / "b" / "mosquitto.conf")], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not connects(free_port, site):  # a site with its certificate gets in, once the broker is up
            assert proc.poll() is None, (tmp_path / "mosquitto.out").read_text()
            assert time.monotonic() < deadline, "the site never connected"
            time.sleep(0.1)
        assert not connects(free_port, TLSConfig(ca_file=pki.ca_cert))  # no certificate, no entry
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
