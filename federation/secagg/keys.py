"""Key agreement and authenticated encryption for secure aggregation, all from `cryptography`.

Each site holds an X25519 key pair per round. Two sites agree on a secret (X25519, then HKDF-SHA256 with a
purpose label, so the mask seed and the share-encryption key of one pair are independent) without the aggregator
learning it; the shares a site sends its peers through the aggregator are sealed with ChaCha20-Poly1305 under
such a key, with associated data naming the job, round, sender and recipient, so the aggregator can neither read
a share nor replay it into another round or hand it to another recipient.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
INFO_PREFIX = b"fedsilo/secagg/v1/"
_SHARE_AD_LABEL = b"fedsilo/secagg/v1/share"


def new_private_key() -> bytes:
    """A fresh X25519 private key, 32 raw bytes (the OS's CSPRNG, through OpenSSL)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def _private(private: bytes) -> X25519PrivateKey:
    if not isinstance(private, bytes) or len(private) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(private)


def public_key(private: bytes) -> bytes:
    """The 32 raw bytes of the public key that belongs to `private`."""
    return _private(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """The 32-byte secret two sites share: X25519, then HKDF-SHA256 with info `fedsilo/secagg/v1/<purpose>`.

    Both sides get the same bytes (agree(a, B, p) == agree(b, A, p)); different purposes give independent keys.
    A peer key of the wrong length or of low order (whose shared secret is all zeros, which would let whoever
    chose it know the "secret") is refused."""
    if not purpose:
        raise SecAggError("key agreement needs a purpose label")
    own = _private(private)
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {KEY_BYTES} bytes")
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # cryptography refuses an all-zero shared secret (a low-order peer key)
        raise SecAggError(f"peer public key refused: {e}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=INFO_PREFIX + purpose).derive(shared)


def _aead(key: bytes) -> ChaCha20Poly1305:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise SecAggError(f"a ChaCha20-Poly1305 key is {KEY_BYTES} bytes")
    return ChaCha20Poly1305(key)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """`plaintext` encrypted and authenticated under `key`, bound to `ad`: nonce (12 random bytes) ‖ ciphertext ‖ tag.

    A random nonce is safe here: a key seals a handful of messages, far from the 2^48 or so at which 96-bit random
    nonces risk a collision."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, blob: bytes, ad: bytes) -> bytes:
    """The plaintext of a `seal`ed blob; SecAggError if the key, the associated data or any byte of the blob is
    not what it was sealed with."""
    aead = _aead(key)
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError("sealed blob too short")
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag:
        raise SecAggError("sealed blob does not open: wrong key, wrong associated data or tampered") from None


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def share_ad(job_id: str, rnd: int, sender: str, recipient: str) -> bytes:
    """The associated data a share is sealed with: label ‖ len‖job ‖ round (8 bytes) ‖ len‖sender ‖ len‖recipient.

    Every variable-length field carries its 4-byte big-endian length, so no two different (job, round, sender,
    recipient) tuples encode alike (no "a|bc" = "ab|c" ambiguity) and a share opens only where it was meant to."""
    if not 0 <= rnd < 2**64:
        raise SecAggError(f"round must be in [0, 2^64), got {rnd}")
    parts = (job_id.encode(), sender.encode(), recipient.encode())
    if not all(parts):
        raise SecAggError("job id, sender and recipient must be non-empty")
    return _SHARE_AD_LABEL + _field(parts[0]) + struct.pack(">Q", rnd) + _field(parts[1]) + _field(parts[2])
