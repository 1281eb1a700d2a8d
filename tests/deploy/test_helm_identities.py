"""The aggregator chart's CRL and operators file (crl.existingSecret, operatorsFile.existingSecret) at work, on
the files the kubelet writes for a Secret volume: a directory whose files are symlinks through `..data` into a
timestamped directory, and an update swaps `..data` atomically. The aggregator, configured as the chart renders
it, honours a revocation once the swap happens (no restart); the chart's own mosquitto.conf, run by a real
Mosquitto, refuses the revoked certificate after the restart docs/deploy.md asks for."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509

from aggregator.auth import Identity, OperatorToken, OperatorTokens, TokenRefusal, new_token, write_operators_file
from aggregator.config import AggregatorConfig
from aggregator.revocation import RevocationList
from federation.transport import TLSConfig
from fedsilo.broker import MosquittoBroker, run_as
from fedsilo.certs import Pki
from fedsilo.cli import main
from tests.deploy._chart_identities import secret_file
from tests.deploy._helm import manifests, one
from tests.deploy._tools import CHARTS
from tests.integration.test_broker_config import connects

HA_VALUES = CHARTS / "aggregator" / "ci" / "ha-values.yaml"  # sets crl and operatorsFile
SINGLE_VALUES = CHARTS / "aggregator" / "ci" / "sqlite-mosquitto-values.yaml"  # the chart's Mosquitto


class SecretVolume:
    """A Secret volume as the kubelet's atomic writer keeps it: `<dir>/<key>` -> `..data/<key>`, `..data` ->
    `..<timestamp>/`; an update writes a new timestamped directory and renames a new `..data` link over the old."""

    _generation = itertools.count()

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)

    def project(self, files: dict[str, bytes]) -> None:
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        stamp = f"..2025_01_01_00_00_00.{next(self._generation)}"
        (self.root / stamp).mkdir()
        for name, data in files.items():
            (self.root / stamp / name).write_bytes(data)
        (self.root / "..data_tmp").symlink_to(stamp)
        os.replace(self.root / "..data_tmp", self.root / "..data")
        for name in files:
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(self.root / old)


def under(root: Path, path: PurePosixPath | Path) -> Path:
    """`path` from inside the container, on this machine under `root`."""
    return root / str(path).lstrip("/")


def cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_the_aggregator_honours_a_revocation_the_kubelet_swaps_in(tmp_path: Path) -> None:
    """The paths of the rendered config, in the mounts of the rendered pod: a certificate revoked with
    `fedsilo certs revoke` and a token revoked with `fedsilo operator revoke --file` are refused by the objects
    that the running aggregator already holds, as soon as the kubelet swaps the Secrets' new contents in."""
    docs = manifests("aggregator", HA_VALUES)
    rendered = yaml.safe_load(one(docs, "ConfigMap", "fedsilo")["data"]["aggregator.yaml"])
    config = AggregatorConfig.model_validate(rendered)
    pod = one(docs, "Deployment", "fedsilo")["spec"]["template"]["spec"]
    (agg,) = [c for c in pod["containers"] if c["name"] == "aggregator"]
    assert config.crl_file is not None and config.operators_file is not None
    crl_path, operators_path = PurePosixPath(str(config.crl_file)), PurePosixPath(str(config.operators_file))
    crl_key, operators_key = secret_file(pod, agg, crl_path)[1], secret_file(pod, agg, operators_path)[1]

    pki = Pki(tmp_path / "pki")
    pki.init()
    north, south = pki.issue("site", "north"), pki.issue("site", "south")
    token, digest = new_token()
    operators = tmp_path / "operators.yaml"  # the operator's own copy, the source of the Secret
    write_operators_file(operators, (OperatorToken(name="bob", role="viewer", token_sha256=digest),))

    crl_volume, operators_volume = (SecretVolume(under(tmp_path, p.parent)) for p in (crl_path, operators_path))
    crl_volume.project({crl_key: pki.crl.read_bytes()})
    operators_volume.project({operators_key: operators.read_bytes()})
    crl = RevocationList(under(tmp_path, crl_path), pki.ca_cert)
    crl.load()
    tokens = OperatorTokens(path=under(tmp_path, operators_path))
    tokens.check()
    serial = {name: x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number
              for name, issued in (("north", north), ("south", south))}
    assert not crl.revoked(serial["north"]) and not crl.revoked(serial["south"])
    assert tokens.identify(token) == Identity("bob", "viewer")

    cli("certs", "revoke", "north", "--dir", str(pki.root))
    cli("operator", "revoke", "bob", "--file", str(operators))
    assert not crl.revoked(serial["north"]), "nothing changes before the kubelet refreshes the volume"
    crl_volume.project({crl_key: pki.crl.read_bytes()})
    operators_volume.project({operators_key: operators.read_bytes()})
    assert crl.revoked(serial["north"]) and not crl.revoked(serial["south"])
    refusal = tokens.identify(token)
    assert isinstance(refusal, TokenRefusal) and refusal.reason == "token_revoked"


@pytest.mark.integration
def test_the_charts_broker_refuses_a_revoked_certificate_after_a_restart(tmp_path: Path) -> None:
    """The rendered mosquitto.conf (crlfile after the listener, in the Secret's directory), with only the
    container's paths moved here: a site connects; `fedsilo certs revoke` and the kubelet's refresh of the
    Secret; after the restart the revoked site is refused and the other one still connects."""
    docs = manifests("aggregator", SINGLE_VALUES, sets=("crl.existingSecret=fedsilo-crl",))
    data = one(docs, "ConfigMap", "fedsilo-mosquitto")["data"]
    broker_pod = one(docs, "StatefulSet", "fedsilo-mosquitto")["spec"]["template"]["spec"]
    (mosquitto,) = broker_pod["containers"]
    conf = data["mosquitto.conf"]
    (crlfile,) = [PurePosixPath(line.split(" ", 1)[1]) for line in conf.splitlines() if line.startswith("crlfile ")]
    crl_key = secret_file(broker_pod, mosquitto, crlfile)[1]

    pki = Pki(tmp_path / "pki")
    pki.init()
    issued = pki.issue("broker", "broker")
    sites = {name: pki.issue("site", name) for name in ("north", "south")}
    root = tmp_path / "pod"
    tls_dir = under(root, PurePosixPath("/mosquitto/tls"))
    tls_dir.mkdir(parents=True)
    for name, source in (("ca.crt", pki.ca_cert), ("tls.crt", issued.cert), ("tls.key", issued.key)):
        shutil.copy(source, tls_dir / name)
    volume = SecretVolume(under(root, crlfile.parent))
    volume.project({crl_key: pki.crl.read_bytes()})
    workdir = tmp_path / "broker"
    workdir.mkdir()
    (workdir / "acl").write_text(data["acl"])

    broker = MosquittoBroker(workdir, write_config=False)
    replacements = {
        "/mosquitto/config/acl": str(workdir / "acl"),
        "/mosquitto/data/": f"{workdir}/",
        "/mosquitto/": f"{root}/mosquitto/",
        "log_dest stdout": f"log_dest file {broker.log_file}\nlog_type information",
        "listener 8883 0.0.0.0": f"listener {broker.port} 127.0.0.1",
    }
    for old, new in replacements.items():
        assert old in conf, f"the chart's mosquitto.conf has no {old!r} any more: {conf}"
        conf = conf.replace(old, new)
    broker.config_file.write_text(f"user {run_as(tls_dir / 'tls.key')}\n{conf}")

    def tls(name: str) -> TLSConfig:
        return TLSConfig(ca_file=pki.ca_cert, cert_file=sites[name].cert, key_file=sites[name].key)

    with broker:
        assert connects(broker.port, tls("north")), broker.log_tail()
        cli("certs", "revoke", "north", "--dir", str(pki.root))
        volume.project({crl_key: pki.crl.read_bytes()})
        broker.restart()
        assert not connects(broker.port, tls("north")), "the revoked site must be refused after the restart"
        assert connects(broker.port, tls("south")), broker.log_tail()
