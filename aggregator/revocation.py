"""Client certificates the federation CA revoked (`fedsilo certs revoke`) are refused on every request, from the
moment the aggregator's copy of the CRL changes: no restart.

Why here and not in the TLS handshake (`ssl.VERIFY_CRL_CHECK_LEAF` on the server's SSLContext): OpenSSL can add a
CRL to a live context's store but never replace or remove one (which of several CRLs from one issuer it then uses
is its own choice), and a handshake-time check misses what is already past the handshake: kept-alive connections
opened before the revocation, and TLS sessions resumed from before it. So the server's context verifies the chain
only, and this middleware checks the serial of the peer's certificate on each request against the current CRL. The
CRL file costs one stat() per request that carries a client certificate; it is parsed (and its signature checked
against the federation CA) only when its modification time, size or inode changed.

A CRL that cannot be read, or is not signed by the CA, never unrevokes anything: the last good list stays in force,
and the failure is counted and logged. A CRL past its next-update time is still enforced (Mosquitto, on the other
hand, then refuses every client); `fedsilo_crl_next_update_timestamp_seconds` is there to alert on before that.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client import CollectorRegistry, Counter, Gauge

from aggregator.api import Handler, error
from aggregator.auth import certificate_identity
from aggregator.filewatch import FileWatch
from aggregator.ingress import RateLimitedLog

log = structlog.get_logger(__name__)
MAX_CRL_BYTES = 16 << 20  # about 400,000 revoked serials; a CRL larger than this is refused unread
ROLES = ("site", "operator", "aggregator", "broker")  # metric labels: anything else counts as "other"


class RevocationError(Exception):
    pass


class IdentityMetrics:
    """Refused certificates and tokens, and the health of the files revocations come from (bounded labels)."""

    def __init__(self, registry: CollectorRegistry, with_crl: bool = True) -> None:
        """`with_crl`: export the CRL's gauges (only when there is a CRL: a 0 would read as long expired)."""
        self.revoked_refused = Counter(
            "fedsilo_revoked_certificate_requests", "Requests refused because the client certificate is in the CRL, "
            "by the certificate's role.", ["role"], registry=registry)
        self.tokens_refused = Counter(
            "fedsilo_operator_tokens_refused", "Bearer tokens refused, by reason (unknown_token, token_expired, "
            "token_revoked).", ["reason"], registry=registry)
        self.reload_failures = Counter(
            "fedsilo_identity_file_reload_failures", "CRL or operators file changes that could not be loaded (the "
            "last good CRL stays in force; the operators file's tokens are refused until it is fixed).", ["file"],
            registry=registry)
        self.crl_revoked: Gauge | None = None
        self.crl_next_update: Gauge | None = None
        if with_crl:
            self.crl_revoked = Gauge("fedsilo_crl_revoked_certificates", "Serials in the CRL in force.",
                                     registry=registry)
            self.crl_next_update = Gauge(
                "fedsilo_crl_next_update_timestamp_seconds", "When the CRL in force says it is next updated (Unix "
                "time): re-sign it (`fedsilo certs crl`) before then, or Mosquitto refuses every client.",
                registry=registry)


class RevocationList:
    """The serials revoked by the federation CA, from `path`, reloaded when the file changes."""

    def __init__(self, path: Path, ca_file: Path, metrics: IdentityMetrics | None = None) -> None:
        self.path, self._metrics = path, metrics
        try:
            self._cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise RevocationError(f"cannot read the CA certificate {ca_file} to check the CRL with: {exc}") from None
        self._serials: frozenset[int] = frozenset()
        self._watch = FileWatch(path)
        self._log = RateLimitedLog()

    def load(self) -> None:
        """Read the CRL now; RevocationError with one line if it is missing, too large or not the CA's (at start)."""
        try:
            self._watch.mark()
        except OSError as exc:
            raise RevocationError(f"cannot read the CRL {self.path}: {exc.strerror or exc}") from None
        self._apply(self._parse())

    def revoked(self, serial: int) -> bool:
        self._refresh()
        return serial in self._serials

    def _refresh(self) -> None:
        if not self._watch.changed():
            return
        try:
            self._apply(self._parse())
        except RevocationError as exc:
            if self._metrics is not None:
                self._metrics.reload_failures.labels("crl").inc()
            log.error("crl_reload_failed", path=str(self.path), error=str(exc)[:500],
                      effect=f"the last good CRL ({len(self._serials)} revoked) stays in force")

    def _parse(self) -> x509.CertificateRevocationList:
        try:
            size = self.path.stat().st_size
            if size > MAX_CRL_BYTES:
                raise RevocationError(f"{self.path} is {size} bytes; at most {MAX_CRL_BYTES} are read")
            data = self.path.read_bytes()
        except OSError as exc:
            raise RevocationError(f"cannot read the CRL {self.path}: {exc.strerror or exc}") from None
        try:
            crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise RevocationError(f"{self.path} is not a CRL: {exc}") from None
        if not any(ca.subject == crl.issuer and _signed_by(crl, ca) for ca in self._cas):
            raise RevocationError(f"{self.path} is not signed by the federation CA ({crl.issuer.rfc4514_string()})")
        return crl

    def _apply(self, crl: x509.CertificateRevocationList) -> None:
        self._serials = frozenset(r.serial_number for r in crl)
        next_update = crl.next_update_utc
        log.info("crl_loaded", path=str(self.path), revoked=len(self._serials),
                 next_update=next_update.isoformat() if next_update else None)
        if next_update is not None and next_update < dt.datetime.now(dt.UTC):
            log.warning("crl_past_next_update", path=str(self.path), next_update=next_update.isoformat(),
                        effect="still enforced here; Mosquitto refuses every client: re-sign it (fedsilo certs crl)")
        if self._metrics is not None and self._metrics.crl_revoked is not None:
            self._metrics.crl_revoked.set(len(self._serials))
        if self._metrics is not None and self._metrics.crl_next_update is not None:
            self._metrics.crl_next_update.set(next_update.timestamp() if next_update else float("nan"))

    def refusal(self, request: web.Request, metrics: IdentityMetrics | None) -> web.Response | None:
        """The 403 for a request whose client certificate is revoked; None for any other request."""
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        serial = cert.get("serialNumber") if cert else None
        try:
            if not isinstance(serial, str) or not self.revoked(int(serial, 16)):
                return None
        except ValueError:  # never from a certificate OpenSSL verified; not worth a 500 either
            return None
        who = certificate_identity(request)
        name, role = (who.name, who.role) if who is not None else ("unknown", "other")
        label = role if role in ROLES else "other"
        if metrics is not None:
            metrics.revoked_refused.labels(label).inc()
        self._log.warning("revoked_certificate_refused", (label, name[:64]), name=name,
                          role=role, serial=serial, path=request.path)
        return error(403, "certificate_revoked",
                     f"the certificate of {label} {name[:64]!r} (serial {serial.lower()[:40]}) has been revoked "
                     "by the federation CA")


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return False
    return crl.is_signature_valid(key)


def refuse_revoked(crl: RevocationList, metrics: IdentityMetrics | None = None) -> Middleware:
    """Middleware: a request whose client certificate is revoked is answered 403 `certificate_revoked`, whatever it
    asks for, before any handler (and so before anything is read from its body or written to the store)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = crl.refusal(request, metrics)
        return refused if refused is not None else await handler(request)

    return middleware
