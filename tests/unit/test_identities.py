"""Identities: one safe alphabet for every name wherever it enters (certificates, the broker's config and ACL, local
federations, operator tokens), files only inside the PKI directory, and certificate revocation (a CRL signed by the
CA, re-issue only with --force) as the PKI writes it and the aggregator reads it."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from aggregator.auth import OperatorToken
from aggregator.revocation import IdentityMetrics, RevocationError, RevocationList
from fedsilo.broker import BrokerError, acl_for
from fedsilo.certs import CertError, Pki, check_name
from fedsilo.cli import main
from fedsilo.localinit import parse_sites
from fedsilo.workspace import LocalError

BAD_NAMES = ["+", "#", "../../x", "a/b", "", "North", "a b", "north\n", "a\x00b", "..", "x" * 64, "-x", "a+", "a#b",
             "site.one", "a_b", "ä"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.init()
    p.issue("broker", "broker")
    return p


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------- names
@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("command", ["issue-site", "issue-operator"])
def test_certs_refuse_unsafe_names_and_write_nothing(tmp_path: Path, pki: Pki, command: str, name: str) -> None:
    before = files_under(tmp_path)
    code, out = run("certs", command, "--dir", str(pki.root), "--", name)
    assert code != 0
    assert f"{name!r} is not a valid" in out and "use 1 to 63 lowercase letters" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert files_under(tmp_path) == before  # nothing inside --dir, nothing beside it (../../x)


@pytest.mark.parametrize("role", ["site", "operator", "aggregator", "broker"])
@pytest.mark.parametrize("name", ["+", "../../x", "a/b", ""])
def test_every_role_goes_through_the_name_rule(pki: Pki, role: str, name: str) -> None:
    with pytest.raises(CertError, match="is not a valid"):
        pki.issue(role, name)
    with pytest.raises(CertError, match="is not a valid"):
        pki.issued(role, name)


def test_a_role_folder_that_leads_outside_the_pki_directory_is_refused(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "elsewhere").mkdir()
    (pki.root / "site").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CertError, match="outside"):
        pki.issue("site", "north")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_good_names_are_issued_in_their_role_folder(pki: Pki) -> None:
    for name in ("north", "a", "0", "st-marys-2", "x" * 63):
        issued = pki.issue("site", name)
        assert issued.cert.parent == pki.root / "site" and issued.cert.name == f"{name}.crt"
    assert pki.issue("operator", "ops-admin").cert == pki.root / "operator" / "ops-admin.crt"


@pytest.mark.parametrize("name", ["+", "#", "../../x", "a/b", "North", "a b", "north\nuser aggregator"])
def test_broker_config_refuses_unsafe_site_names(tmp_path: Path, pki: Pki, name: str) -> None:
    code, out = run("broker", "config", "--sites", f"north,{name}", "--dir", str(pki.root),
                    "--out", str(tmp_path / "b"))
    assert code != 0 and "is not a valid site name" in out
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["+", "#", "../../x", "a/b", "", "North", "a b", "north\nuser aggregator"])
def test_the_acl_generator_refuses_unsafe_names_rather_than_escaping_them(name: str) -> None:
    with pytest.raises(BrokerError, match="cannot be named in the broker's ACL"):
        acl_for(["north", name])
    with pytest.raises(BrokerError, match="cannot be named in the broker's ACL"):
        acl_for(["north"], aggregator=name)
    with pytest.raises(BrokerError, match="the aggregator's name"):
        acl_for(["north", "aggregator"])


@pytest.mark.parametrize("name", ["+", "#", "../../x", "a/b", "North", "a b"])
def test_local_init_refuses_unsafe_site_names(tmp_path: Path, name: str) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,b\n1,2\n")
    with pytest.raises(LocalError, match="is not a valid site name"):
        parse_sites([f"{name}={data}"], None)


@pytest.mark.parametrize("name", ["a b", "+", "Alice", "a/b", ""])
def test_operator_token_names_follow_the_same_rule(name: str) -> None:
    with pytest.raises(ValidationError):
        OperatorToken(name=name, role="viewer", token_sha256="0" * 64)
    code, out = run("operator", "token", "--", name)
    assert code != 0 and "is not a valid operator name" in out


def test_check_name_accepts_exactly_the_safe_alphabet() -> None:
    assert check_name("st-marys-2") == "st-marys-2"
    for name in BAD_NAMES:
        with pytest.raises(CertError):
            check_name(name)


# ---------------------------------------------------------------- revocation: the PKI side
def crl_of(pki: Pki) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pki.crl.read_bytes())


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_init_writes_an_empty_crl_signed_by_the_ca(pki: Pki) -> None:
    crl = crl_of(pki)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert len(crl) == 0 and crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=179)
    assert pki.crl.stat().st_mode & 0o777 == 0o600


def test_revoke_lists_the_serial_and_reissue_needs_force(pki: Pki) -> None:
    north = pki.issue("site", "north")
    pki.issue("site", "south")
    old = serial(north.cert)
    code, out = run("certs", "revoke", "north", "--dir", str(pki.root), "--days", "30")
    assert code == 0, out
    assert f"revoked site north (serial {old:x})" in out and "restart the broker" in out
    crl = crl_of(pki)
    assert [r.serial_number for r in crl] == [old]
    assert crl.next_update_utc is not None
    assert dt.timedelta(days=29) < crl.next_update_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    assert [(r.role, r.name, r.serial) for r in pki.revocations()] == [("site", "north", old)]

    code, out = run("certs", "issue-site", "north", "--dir", str(pki.root))
    assert code != 0 and "was revoked on" in out and "--force" in out
    code, out = run("certs", "revoke", "north", "--dir", str(pki.root))
    assert code != 0 and "already revoked" in out
    code, out = run("certs", "issue-site", "north", "--dir", str(pki.root), "--force")
    assert code == 0, out
    assert serial(north.cert) != old
    assert [r.serial_number for r in crl_of(pki)] == [old]  # the old certificate stays revoked

    code, out = run("certs", "revoke", "nobody", "--dir", str(pki.root))
    assert code != 0 and "no certificate named 'nobody'" in out
    code, out = run("certs", "revoke", "../ca", "--dir", str(pki.root))
    assert code != 0 and "is not a valid" in out


def test_revoke_asks_for_the_role_when_a_name_has_several(pki: Pki) -> None:
    pki.issue("site", "alice")
    op = pki.issue("operator", "alice")
    code, out = run("certs", "revoke", "alice", "--dir", str(pki.root))
    assert code != 0 and "say which with --role" in out
    code, out = run("certs", "revoke", "alice", "--role", "operator", "--dir", str(pki.root))
    assert code == 0, out
    assert [r.serial_number for r in crl_of(pki)] == [serial(op.cert)]


def test_crl_command_resigns_with_a_new_next_update(pki: Pki) -> None:
    pki.issue("site", "north")
    pki.revoke("north", days=1)
    code, out = run("certs", "crl", "--dir", str(pki.root), "--days", "90")
    assert code == 0 and "1 revoked certificate(s)" in out
    crl = crl_of(pki)
    assert len(crl) == 1 and crl.next_update_utc is not None
    assert crl.next_update_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=89)


def test_broker_config_names_the_crl_and_gives_an_older_pki_one(tmp_path: Path, pki: Pki) -> None:
    pki.crl.unlink()  # a PKI directory made before revocation existed
    code, out = run("broker", "config", "--sites", "north", "--dir", str(pki.root), "--out", str(tmp_path / "b"))
    assert code == 0, out
    assert pki.crl.exists() and len(crl_of(pki)) == 0
    conf = (tmp_path / "b" / "mosquitto.conf").read_text()
    assert f"\ncrlfile {pki.root.resolve() / 'crl.pem'}\n" in conf
    assert "\nmessage_size_limit 262144\n" in conf


def test_broker_config_without_a_ca_key_or_crl_says_revocations_are_unchecked(tmp_path: Path, pki: Pki) -> None:
    pki.crl.unlink()
    pki.ca_key.unlink()  # the broker's host has only the CA certificate
    code, out = run("broker", "config", "--sites", "north", "--dir", str(pki.root), "--out", str(tmp_path / "b"))
    assert code == 0, out
    assert "the broker checks no revocations" in out
    assert "crlfile" not in (tmp_path / "b" / "mosquitto.conf").read_text()


# ---------------------------------------------------------------- revocation: the aggregator side
def test_revocation_list_follows_the_file_and_never_forgets_on_a_bad_one(tmp_path: Path, pki: Pki) -> None:
    north, south = pki.issue("site", "north"), pki.issue("site", "south")
    metrics = IdentityMetrics(CollectorRegistry())
    crl = RevocationList(pki.crl, pki.ca_cert, metrics)
    crl.load()
    assert not crl.revoked(serial(north.cert))
    pki.revoke("north")
    assert crl.revoked(serial(north.cert)) and not crl.revoked(serial(south.cert))  # no restart, no reload call
    assert metrics.crl_revoked is not None and metrics.crl_revoked._value.get() == 1

    good = pki.crl.read_bytes()
    pki.crl.write_bytes(b"not a crl")
    assert crl.revoked(serial(north.cert))  # a broken file keeps the last good list
    other = Pki(tmp_path / "other")
    other.init()
    pki.crl.write_bytes(other.crl.read_bytes())  # signed by another CA: refused, nothing unrevoked
    assert crl.revoked(serial(north.cert))
    pki.crl.unlink()
    assert crl.revoked(serial(north.cert))
    assert metrics.reload_failures.labels("crl")._value.get() == 3
    pki.crl.write_bytes(good)
    pki.issue("site", "north", force=True)
    assert not crl.revoked(serial(north.cert)) and crl.revoked(good_serial(good))


def good_serial(pem: bytes) -> int:
    return next(iter(x509.load_pem_x509_crl(pem))).serial_number


def test_revocation_list_refuses_to_start_from_a_missing_or_foreign_crl(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(RevocationError, match="cannot read the CRL"):
        RevocationList(tmp_path / "nope.pem", pki.ca_cert).load()
    other = Pki(tmp_path / "other")
    other.init()
    with pytest.raises(RevocationError, match="not signed by the federation CA"):
        RevocationList(other.crl, pki.ca_cert).load()
    big = tmp_path / "big.pem"
    with big.open("wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(RevocationError, match="at most"):
        RevocationList(big, pki.ca_cert).load()


def test_revocation_list_reads_the_file_only_when_it_changes(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    crl = RevocationList(pki.crl, pki.ca_cert)
    crl.load()
    reads: list[Path] = []
    real = Path.read_bytes

    def counted(self: Path) -> bytes:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counted)
    for _ in range(1000):
        crl.revoked(1)
    assert reads == []
    pki.write_crl()  # reads the CA's files
    reads.clear()
    crl.revoked(1)
    assert reads == [pki.crl]
    os.utime(pki.crl)
    crl.revoked(1)
    assert reads == [pki.crl, pki.crl]


def test_the_aggregator_publishes_what_the_broker_takes_and_accepts_no_more() -> None:
    """The broker's limit (what `fedsilo broker config` and the chart write) is the aggregator's largest publish, and
    a site message the aggregator would accept is never one the broker drops."""
    from aggregator.config import AggregatorConfig
    from fedsilo.broker import MESSAGE_SIZE_LIMIT

    assert AggregatorConfig().mqtt_max_publish_bytes == MESSAGE_SIZE_LIMIT
    with pytest.raises(ValueError, match="the broker would drop what the aggregator accepts"):
        AggregatorConfig(mqtt_max_message_bytes=MESSAGE_SIZE_LIMIT + 1)
