"""Who may call the aggregator, and as what: sites by client certificate; operators by client certificate
(role admin) or by a bearer token (role admin or viewer) — the console and scripts use tokens.

Tokens are stored only as sha256 hashes in the configuration and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from pydantic import Field

from federation.schema import Frozen

Role = Literal["viewer", "admin"]


class OperatorToken(Frozen):
    name: str = Field(min_length=1, max_length=64)
    role: Role
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Identity:
    """A caller: its name and role. Sites come only from certificates; the role is the certificate's OU."""

    name: str
    role: str  # site | operator | viewer | admin | aggregator | broker


def new_token() -> tuple[str, str]:
    """A fresh operator token and the sha256 to put in the aggregator's configuration."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def certificate_identity(request: web.Request) -> Identity | None:
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    fields = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    name, role = fields.get("commonName"), fields.get("organizationalUnitName")
    return Identity(str(name), str(role)) if name and role else None


def token_identity(request: web.Request, tokens: tuple[OperatorToken, ...]) -> Identity | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    digest = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).hexdigest()
    for t in tokens:
        if hmac.compare_digest(digest, t.token_sha256):
            return Identity(t.name, t.role)
    return None


def operator_identity(request: web.Request, tokens: tuple[OperatorToken, ...]) -> Identity | None:
    """An operator certificate counts as admin; otherwise a valid bearer token with its role."""
    cert = certificate_identity(request)
    if cert is not None and cert.role == "operator":
        return Identity(cert.name, "admin")
    return token_identity(request, tokens)
