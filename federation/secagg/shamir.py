"""t-of-n secret sharing of a site's mask seed and private key, so the aggregator can finish a round when sites
drop out (and only then: fewer than t shares say nothing about the secret).

Built on pycryptodome's `Crypto.Protocol.SecretSharing.Shamir`, which shares one 16-byte secret over GF(2^128)
at the points x = 1, 2, …, n. Its limits, and ours on top:

- a secret is 16 bytes; a 32-byte secret (an X25519 key, a 32-byte seed) is shared as two 16-byte halves with
  independent polynomials at the same indices;
- its indices are field elements, so any 1 ≤ x < 2^128 works (x = 0 would be the secret itself); our share format
  gives the index 2 bytes, so n ≤ 65535;
- its `combine` interpolates through exactly the points it is given and cannot tell a wrong answer: given fewer
  than t shares it returns garbage without complaint. So `combine` here counts the shares against the threshold
  first, and interpolates in the same field with coefficients computed once per index set (`gf128`: 15–35× faster,
  checked against pycryptodome's `combine` in the tests). Neither can detect a share that is well-formed but false
  (a lying holder): a caller checks a reconstructed secret against its commitment (a private key against the
  public key the site announced, a self seed against the hash in its share bundle).

Share layout (fixed): 2-byte big-endian index (1…n) ‖ 16 bytes per half (the half-secrets' shares in order), so a
share of a 16-byte secret is 18 bytes and of a 32-byte secret 34 bytes.
"""

from __future__ import annotations

import struct

from Crypto.Protocol.SecretSharing import Shamir

from federation.secagg import gf128
from federation.secagg.errors import SecAggError

HALF = 16
INDEX_BYTES = 2
MAX_SHARES = 2**16 - 1
SECRET_SIZES = (HALF, 2 * HALF)


def split(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """`n` shares of `secret` (16 or 32 bytes), any `threshold` of which rebuild it; share i has index i + 1.

    threshold = 1 is allowed and makes every share the secret itself; the protocol chooses t."""
    if not isinstance(secret, bytes) or len(secret) not in SECRET_SIZES:
        raise SecAggError("a shared secret is 16 or 32 bytes")
    if not 1 <= threshold <= n <= MAX_SHARES:
        raise SecAggError(f"need 1 ≤ threshold ≤ n ≤ {MAX_SHARES}, got threshold {threshold}, n {n}")
    per_half = [Shamir.split(threshold, n, secret[i : i + HALF], ssss=False) for i in range(0, len(secret), HALF)]
    shares = []
    for i in range(n):
        index = per_half[0][i][0]
        if index != i + 1 or any(half[i][0] != index for half in per_half):  # pycryptodome's documented order
            raise SecAggError("unexpected share order from the secret-sharing library")
        shares.append(struct.pack(">H", index) + b"".join(half[i][1] for half in per_half))
    return shares


def _parse(share: bytes) -> tuple[int, bytes]:
    if not isinstance(share, bytes) or len(share) - INDEX_BYTES not in SECRET_SIZES:
        raise SecAggError(f"a share is {INDEX_BYTES} + 16 or {INDEX_BYTES} + 32 bytes")
    index = struct.unpack(">H", share[:INDEX_BYTES])[0]
    if index == 0:
        raise SecAggError("share index 0 is not a share")
    return index, share[INDEX_BYTES:]


def combine(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` well-formed shares of one length with distinct indices.

    Exactly `threshold` of them are used (the first distinct ones in the order given). A repeated share is
    counted once; two different shares claiming one index are refused, as is anything short of the threshold."""
    if threshold < 1:
        raise SecAggError(f"threshold must be at least 1, got {threshold}")
    by_index: dict[int, bytes] = {}
    length = None
    for share in shares:
        index, body = _parse(share)
        if length is None:
            length = len(body)
        elif len(body) != length:
            raise SecAggError("shares of different lengths: they belong to different secrets")
        if by_index.setdefault(index, body) != body:
            raise SecAggError(f"two different shares for index {index}")
    if len(by_index) < threshold:
        raise SecAggError(f"{len(by_index)} distinct shares, need {threshold}")
    chosen = list(by_index.items())[:threshold]
    assert length is not None
    halves = []
    for offset in range(0, length, HALF):
        points = [(index, int.from_bytes(body[offset : offset + HALF], "big")) for index, body in chosen]
        halves.append(gf128.interpolate_at_zero(points).to_bytes(HALF, "big"))
    return b"".join(halves)
