"""The federation's PKI: a CA, certificates for sites, the aggregator, the broker and operators, the Ed25519 key
the aggregator signs jobs with, and the certificate revocation list. Built with `cryptography`; every file written
is mode 0600 and lies inside the PKI directory.

Identities: a certificate's common name is the party's name (a site name, `aggregator`, `broker`, an
operator's name) and its organizational unit its role (`site`, `aggregator`, `broker`, `operator`). Every name,
whatever its role, is drawn from one safe alphabet (`check_name`), because each becomes an MQTT username that the
broker's ACL keys on, a topic segment, a file name and an HTTP header value.

Revocation (`Pki.revoke`): the revoked certificates are recorded in `revoked.json` and listed, by serial, in
`crl.pem`, a CRL signed by the CA that Mosquitto (`crlfile`) and the aggregator (`crl_file`) read. `init` writes
an empty one, so that the broker's `crlfile` always names an existing file. A CRL has a next-update time: past it,
OpenSSL (and so Mosquitto) refuses every client, so `fedsilo certs crl` re-signs it well before then.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
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
# How long a CRL stays valid after it is signed. Past its next-update time Mosquitto refuses every client: re-sign
# it (`fedsilo certs crl`) well before; the aggregator exports the time as `fedsilo_crl_next_update_timestamp_seconds`.
CRL_DAYS = 180
# A name is a certificate's CN, an MQTT username (the broker ACL keys on it), a topic segment, a file name under the
# PKI directory and, for sites, an entry of jobs: `federation.jobs.SITE_NAME` (1 to 63 of a-z, 0-9 and '-', not
# starting with '-') keeps out MQTT wildcards (`+`, `#`), `/`, `..`, spaces, NUL and anything a shell or YAML reads.
NAME_RULE = "1 to 63 lowercase letters, digits and '-', starting with a letter or digit"


class CertError(Exception):
    pass


def check_name(name: str, role: str = "site") -> str:
    """`name` if it can be the CN of a certificate in `role` (MQTT username, topic segment, file name); CertError
    saying why not."""
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        raise CertError(f"{name!r} is not a valid {role} name (certificate CN and MQTT topic segment): use "
                        f"{NAME_RULE}")
    return name


def check_site_name(name: str) -> str:
    """`name` if it can be a site's certificate CN, topic segment and job entry; CertError saying why not."""
    return check_name(name, "site")


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate, as recorded in `revoked.json`."""

    role: str
    name: str
    serial: int
    revoked_at: str  # ISO 8601, UTC


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
    """A PKI directory: `ca.crt`, `ca.key`, `job-signing.key`, `job-signing.pub`, `crl.pem`, `revoked.json`, and
    `<role>/<name>.{crt,key}`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def revoked_file(self) -> Path:
        return self.root / "revoked.json"

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
        """Where `role`/`name`'s certificate and key are; CertError for a role or name that could lead elsewhere."""
        if role not in ROLES:
            raise CertError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        check_name(name, role)
        out = Issued(self.root / role / f"{name}.crt", self.root / role / f"{name}.key")
        root = self.root.resolve()
        for path in (out.cert, out.key):  # the name rule already keeps paths in; a symlinked role folder would not
            if path.resolve().parent != root / role:
                raise CertError(f"{path} resolves to {path.resolve()}, outside {root / role}; refusing to use it")
        return out

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
        # A new CA revokes nothing yet; earlier records named another CA's serials.
        _write(self.revoked_file, b"[]\n", True)
        self.write_crl()

    def issue(self, role: str, name: str, hosts: list[str] | None = None, force: bool = False) -> Issued:
        """Issue a certificate for `name` in `role`; servers (aggregator, broker) get `hosts` as SANs."""
        out = self.issued(role, name)  # checks the role and the name
        if not self.ca_key.exists():
            raise CertError(f"no CA in {self.root}; run `fedsilo certs init` first")
        revoked = [r for r in self.revocations() if (r.role, r.name) == (role, name)]
        if revoked and not force:
            raise CertError(f"{role} {name!r} was revoked on {revoked[-1].revoked_at}; pass --force to issue it a "
                            "new certificate (with a new serial; the revoked one stays in the CRL)")
        if (out.cert.exists() or out.key.exists()) and not force:
            raise CertError(f"{out.cert} exists; pass --force to overwrite it")
        ca_key, ca_cert = self._ca()
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

    # -- revocation ------------------------------------------------------------------------------------
    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.ca_key.exists():
            raise CertError(f"no CA in {self.root}; run `fedsilo certs init` first")
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{self.ca_key} is not an ECDSA key")
        return ca_key, x509.load_pem_x509_certificate(self.ca_cert.read_bytes())

    def revocations(self) -> list[Revoked]:
        """The revoked certificates, oldest first (none for a PKI directory made before revocation existed)."""
        if not self.revoked_file.exists():
            return []
        try:
            return [Revoked(role=str(r["role"]), name=str(r["name"]), serial=int(r["serial"]),
                            revoked_at=str(r["revoked_at"])) for r in json.loads(self.revoked_file.read_text())]
        except (ValueError, TypeError, KeyError) as exc:
            raise CertError(f"{self.revoked_file} is not a list of revocations: {exc}") from None

    def revoke(self, name: str, role: str | None = None, days: int = CRL_DAYS) -> Revoked:
        """Revoke `name`'s current certificate (in `role`, needed only when several roles have that name): record
        it and re-sign the CRL. The certificate and key stay where they are; issuing the name again needs --force."""
        check_name(name, role or "certificate")
        roles = [role] if role is not None else [r for r in ROLES if self.issued(r, name).cert.exists()]
        if not roles or not self.issued(roles[0], name).cert.exists():
            raise CertError(f"no certificate named {name!r}{f' in role {role}' if role else ''} in {self.root}")
        if len(roles) > 1:
            raise CertError(f"{name!r} has certificates in roles {', '.join(roles)}: say which with --role")
        cert = x509.load_pem_x509_certificate(self.issued(roles[0], name).cert.read_bytes())
        records = self.revocations()
        done = next((r for r in records if r.serial == cert.serial_number), None)
        if done is not None:
            raise CertError(f"{done.role} {name!r} (serial {done.serial:x}) was already revoked on {done.revoked_at}")
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        entry = Revoked(roles[0], name, cert.serial_number, now.isoformat())
        self._save_revocations([*records, entry])
        self.write_crl(days)
        return entry

    def _save_revocations(self, records: list[Revoked]) -> None:
        rows = [{"role": r.role, "name": r.name, "serial": r.serial, "revoked_at": r.revoked_at} for r in records]
        _write(self.revoked_file, (json.dumps(rows, indent=1) + "\n").encode(), True)

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """Sign a CRL listing every revoked serial, valid for `days`, and put it in place atomically (readers
        never see half a file)."""
        if not 1 <= days <= 3650:
            raise CertError(f"a CRL's validity must be 1 to 3650 days, not {days}")
        ca_key, ca_cert = self._ca()
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days))
                   .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        for r in self.revocations():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(r.serial)
                .revocation_date(dt.datetime.fromisoformat(r.revoked_at)).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        _write(self.crl, crl.public_bytes(serialization.Encoding.PEM), True)
        return self.crl

    def ensure_crl(self) -> Path | None:
        """The CRL, signed now (empty) for a PKI directory made before revocation existed; None when it is missing
        and cannot be made here (no CA key: the broker's host often has only the CA certificate)."""
        if not self.crl.exists() and self.ca_key.exists():
            self.write_crl()
        return self.crl if self.crl.exists() else None


def local_pki(root: Path, sites: list[str], operator: str = "operator") -> Pki:
    """Everything a local federation needs (demo, tests, benchmarks), created once and reused."""
    pki = Pki(root)
    if not pki.ca_cert.exists():
        pki.init()
    pki.ensure_crl()
    for role, name in [("aggregator", "aggregator"), ("broker", "broker"), ("operator", operator),
                       *(("site", s) for s in sites)]:
        if not pki.issued(role, name).cert.exists():
            pki.issue(role, name)
    return pki
