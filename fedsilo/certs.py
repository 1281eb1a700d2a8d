"""The federation's PKI: a CA, certificates for sites, the aggregator, the broker and operators, and the
Ed25519 key the aggregator signs jobs with. Built with `cryptography`; every file written is mode 0600.

Identities: a certificate's common name is the party's name (a site name, `aggregator`, `broker`, an
operator's name) and its organizational unit its role (`site`, `aggregator`, `broker`, `operator`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.jobs import SITE_NAME

ROLES = ("site", "aggregator", "broker", "operator")
VALID_DAYS = 825
# A site's name is its certificate's CN, its MQTT username (the broker ACL keys on it) and a segment of its topics,
# and jobs list it: `federation.jobs.SITE_NAME`, which also keeps MQTT wildcards, `/` and spaces out.


class CertError(Exception):
    pass


def check_site_name(name: str) -> str:
    """`name` if it can be a site's certificate CN, topic segment and job entry; CertError saying why not."""
    if not SITE_NAME.fullmatch(name):
        raise CertError(f"{name!r} is not a valid site name (certificate CN and MQTT topic segment): use 1 to 63 "
                        "lowercase letters, digits and '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, force: bool) -> None:
    if path.exists() and not force:
        raise CertError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Pki:
    """A PKI directory: `ca.crt`, `ca.key`, `job-signing.key`, `job-signing.pub`, and `<role>/<name>.{crt,key}`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "job-signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "job-signing.pub"

    def issued(self, role: str, name: str) -> Issued:
        return Issued(self.root / role / f"{name}.crt", self.root / role / f"{name}.key")

    def init(self, name: str = "fedsilo federation CA", force: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        for path in (self.ca_key, self.ca_cert, self.signing_key, self.signing_pub):
            if path.exists() and not force:
                raise CertError(f"{path} exists; pass --force to overwrite it")
        _write(self.ca_key, _key_pem(key), force)
        _write(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM), force)
        signing = ed25519.Ed25519PrivateKey.generate()
        _write(self.signing_key, _key_pem(signing), force)
        _write(self.signing_pub, signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), force)

    def issue(self, role: str, name: str, hosts: list[str] | None = None, force: bool = False) -> Issued:
        """Issue a certificate for `name` in `role`; servers (aggregator, broker) get `hosts` as SANs."""
        if role not in ROLES:
            raise CertError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if role == "site":
            check_site_name(name)
        if not self.ca_key.exists():
            raise CertError(f"no CA in {self.root}; run `fedsilo certs init` first")
        out = self.issued(role, name)
        if (out.cert.exists() or out.key.exists()) and not force:
            raise CertError(f"{out.cert} exists; pass --force to overwrite it")
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in ("aggregator", "broker"):
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if role in ("aggregator", "broker"):
            sans: list[x509.GeneralName] = []
            for h in hosts or ["localhost", "127.0.0.1"]:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(out.key, _key_pem(key), force)
        _write(out.cert, cert.public_bytes(serialization.Encoding.PEM), force)
        return out


def local_pki(root: Path, sites: list[str], operator: str = "operator") -> Pki:
    """Everything a local federation needs (demo, tests, benchmarks), created once and reused."""
    pki = Pki(root)
    if not pki.ca_cert.exists():
        pki.init()
    for role, name in [("aggregator", "aggregator"), ("broker", "broker"), ("operator", operator),
                       *(("site", s) for s in sites)]:
        if not pki.issued(role, name).cert.exists():
            pki.issue(role, name)
    return pki
