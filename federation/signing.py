"""Ed25519 signatures over canonical JSON: the aggregator signs every job offer and round task, and an
agent acts only on messages that verify against the public key pinned in its own configuration."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from federation.schema import Frozen


class SignatureError(ValueError):
    """Unsigned, malformed or tampered: the message must not be acted on."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sign(message: Frozen, key: ed25519.Ed25519PrivateKey) -> bytes:
    body = message.model_dump(mode="json")
    signature = base64.b64encode(key.sign(_canonical(body))).decode()
    return _canonical({"message": body, "signature": signature})


def verify(data: bytes, public_key: ed25519.Ed25519PublicKey) -> dict[str, Any]:
    """Return the signed message's fields, or raise `SignatureError` saying what is wrong."""
    try:
        envelope = json.loads(data)
    except ValueError:
        raise SignatureError("not JSON") from None
    if not isinstance(envelope, dict) or "signature" not in envelope:
        raise SignatureError("unsigned")
    if not isinstance(envelope.get("message"), dict):
        raise SignatureError("malformed signed envelope")
    try:
        signature = base64.b64decode(envelope["signature"], validate=True)
        public_key.verify(signature, _canonical(envelope["message"]))
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError("bad signature (tampered, or signed by another key)") from None
    message: dict[str, Any] = envelope["message"]
    return message


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
