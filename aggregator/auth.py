"""Who may call the aggregator, and as what: sites by client certificate; operators by client certificate
(role admin) or by a bearer token (role admin or viewer) — the console and scripts use tokens.

Tokens are stored only as sha256 hashes and compared in constant time. They come from the configuration's
`operators` (read once, at start) and from an optional operators file (`operators_file`), which is read again
whenever it changes: a token added, revoked (`revoked: true`), expired (`expires_at`) or removed there takes effect
on the next request, without a restart. Each request costs one stat() of the file; it is parsed only when its
modification time, size or inode changed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
import yaml
from aiohttp import web
from pydantic import AwareDatetime, Field, ValidationError

from aggregator.filewatch import FileWatch
from federation.jobs import SITE_NAME
from federation.schema import Frozen, field_errors
from federation.yamlfile import ConfigFileError, load_yaml

log = structlog.get_logger(__name__)
Role = Literal["viewer", "admin"]
# An operators file larger than this is refused unread (a few thousand entries take well under 1 MiB).
MAX_OPERATORS_FILE_BYTES = 4 << 20


class OperatorToken(Frozen):
    # The operator's name follows the certificates' name rule (`fedsilo.certs.check_name`): it is logged, shown in
    # the console and forwarded between replicas in a header.
    name: str = Field(min_length=1, max_length=63, pattern=SITE_NAME.pattern)
    role: Role
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # After this instant (ISO 8601 with a time zone) the token is refused as expired; None: it does not expire.
    expires_at: AwareDatetime | None = None
    # A revoked token is refused as revoked (kept in the file so that the refusal says so).
    revoked: bool = False


class OperatorsFile(Frozen):
    """The operators file: `operators:` followed by token entries, as `fedsilo operator token --file` writes."""

    operators: tuple[OperatorToken, ...] = Field(default=(), max_length=10_000)


class OperatorsFileError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    """A caller: its name and role. Sites come only from certificates; the role is the certificate's OU."""

    name: str
    role: str  # site | operator | viewer | admin | aggregator | broker


@dataclass(frozen=True)
class TokenRefusal:
    """A bearer token that names no valid operator: `reason` is unknown_token, token_expired or token_revoked."""

    reason: str
    detail: str


def new_token() -> tuple[str, str]:
    """A fresh operator token and the sha256 to put in the aggregator's configuration."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def load_operators_file(path: Path) -> tuple[OperatorToken, ...]:
    """The tokens of an operators file; OperatorsFileError with one line saying what is wrong."""
    try:
        size = path.stat().st_size
        if size > MAX_OPERATORS_FILE_BYTES:
            raise OperatorsFileError(f"{path} is {size} bytes; at most {MAX_OPERATORS_FILE_BYTES} are read")
        data = load_yaml(path.read_text(), str(path)) or {}
        return OperatorsFile.model_validate(data).operators
    except OSError as exc:
        raise OperatorsFileError(f"cannot read the operators file {path}: {exc.strerror or exc}") from None
    except ConfigFileError as exc:  # a syntax error or a key given twice, with the line
        raise OperatorsFileError(str(exc)) from None
    except ValidationError as exc:
        bad = "; ".join(f"{f or '(file)'}: {m}" for f, m in field_errors(exc))
        raise OperatorsFileError(f"{path} is not a valid operators file: {bad}") from None


def write_operators_file(path: Path, tokens: tuple[OperatorToken, ...]) -> None:
    """Write an operators file atomically (a reader sees the old file or the new one, never half of one), 0600."""
    body = OperatorsFile(operators=tokens).model_dump(mode="json", exclude_defaults=True)
    text = ("# Operator bearer tokens (sha256 only), re-read by the aggregator whenever this file changes.\n"
            "# Written by `fedsilo operator token|revoke --file`; see docs/identities.md.\n"
            + yaml.safe_dump({"operators": body.get("operators", [])}, sort_keys=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class OperatorTokens:
    """The tokens operators may use: the configuration's (fixed) and the operators file's (re-read on change).

    A file that becomes unreadable or invalid while the aggregator runs is logged and its tokens are refused until
    it is fixed (failing closed: an edit meant to revoke a token must never leave it valid by breaking the file);
    at start-up `check()` refuses to start with it."""

    def __init__(self, static: tuple[OperatorToken, ...] = (), path: Path | None = None,
                 on_reload_failure: Callable[[], None] | None = None) -> None:
        self._static, self.path, self._on_failure = static, path, on_reload_failure
        self._from_file: tuple[OperatorToken, ...] = ()
        self._watch = FileWatch(path) if path is not None else None

    def check(self) -> None:
        """Load the operators file now; OperatorsFileError if it is missing or invalid (at start-up)."""
        if self.path is not None and self._watch is not None:
            self._from_file = load_operators_file(self.path)
            self._watch.mark()

    def tokens(self) -> tuple[OperatorToken, ...]:
        return self._static + self._current_file()

    def _current_file(self) -> tuple[OperatorToken, ...]:
        if self.path is None or self._watch is None:
            return ()
        if not self._watch.changed():
            return self._from_file
        try:
            self._from_file = load_operators_file(self.path)
            log.info("operators_file_loaded", path=str(self.path), tokens=len(self._from_file))
        except OperatorsFileError as exc:  # logged once per change of the file, not per request
            self._from_file = ()
            if self._on_failure is not None:
                self._on_failure()
            log.error("operators_file_invalid", path=str(self.path), error=str(exc)[:500],
                      effect="its tokens are refused until it is fixed")
        return self._from_file

    def identify(self, token: str, now: dt.datetime | None = None) -> Identity | TokenRefusal:
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for t in self.tokens():  # every entry is compared, in constant time, whatever matches first
            if hmac.compare_digest(digest, t.token_sha256) and found is None:
                found = t
        if found is None:
            return TokenRefusal("unknown_token", "unknown token")
        if found.revoked:
            return TokenRefusal("token_revoked", f"token revoked (operator {found.name!r})")
        now = now or dt.datetime.now(dt.UTC)
        if found.expires_at is not None and found.expires_at <= now:
            return TokenRefusal("token_expired",
                                f"token expired at {found.expires_at.isoformat()} (operator {found.name!r})")
        return Identity(found.name, found.role)


def certificate_identity(request: web.Request) -> Identity | None:
    """The caller's name and role from its client certificate (verified by the TLS layer against the federation CA;
    a revoked one never reaches a handler: `aggregator.revocation`)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    fields = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    name, role = fields.get("commonName"), fields.get("organizationalUnitName")
    return Identity(str(name), str(role)) if name and role else None


def token_identity(request: web.Request, tokens: OperatorTokens) -> Identity | TokenRefusal | None:
    """None without a bearer token; else the operator it names or why it names none."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    return tokens.identify(header.removeprefix("Bearer ").strip())


def operator_identity(request: web.Request, tokens: OperatorTokens) -> Identity | TokenRefusal | None:
    """An operator certificate counts as admin; otherwise a bearer token with its role (or why it was refused)."""
    cert = certificate_identity(request)
    if cert is not None and cert.role == "operator":
        return Identity(cert.name, "admin")
    return token_identity(request, tokens)
