"""Masks that hide each site's vector from the aggregator and cancel in the sum (arithmetic mod 2^32).

Site u sends y_u = x_u + PRG(b_u) + Σ_v sign(u, v)·PRG(s_uv) mod 2^32, where b_u is its own random seed and s_uv
the seed it agreed with peer v (the same bytes on both sides). The pair terms cancel in Σ_u y_u because
sign(u, v) = −sign(v, u); the aggregator learns each survivor's b_u (from t shares) and subtracts PRG(b_u). For a
site that dropped after its peers masked, the survivors' pair terms with it no longer cancel: the aggregator
rebuilds the dropped site's key from shares, re-derives those pair seeds and subtracts them. It never learns both
b_u and the pair seeds of one site, so no single y_u is ever unmasked.

Every y_u on its own is uniform mod 2^32 as long as one PRG term in it is unknown, which is why all arithmetic is
mod 2^32 exactly: vectors are int64 holding values in [0, 2^32), and every result is reduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.secagg.errors import SecAggError

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS
_LOW = np.int64(MODULUS - 1)
SEED_BYTES = 32
_PRG_INFO = b"fedsilo/secagg/v1/prg"
_ZERO_NONCE = bytes(16)


def _key(seed: bytes) -> bytes:
    if not isinstance(seed, bytes) or len(seed) not in (16, SEED_BYTES):
        raise SecAggError("a mask seed is 16 or 32 bytes")
    if len(seed) == SEED_BYTES:
        return seed
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=_PRG_INFO).derive(seed)


def prg(seed: bytes, n: int) -> np.ndarray:
    """`n` pseudo-random values in [0, 2^32) (int64): the AES-256-CTR keystream of `seed`, 4 bytes per value.

    Deterministic, so both ends of a pair expand one seed to one mask. The counter starts at zero: a nonce only
    matters when one key encrypts two messages, and each seed here is expanded once, for one purpose (a pair seed
    comes from `agree` with its own purpose label; a self seed is fresh per round). A 16-byte seed is stretched
    to an AES-256 key with HKDF-SHA256."""
    if n < 0:
        raise SecAggError(f"length must be ≥ 0, got {n}")
    stream = Cipher(algorithms.AES(_key(seed)), modes.CTR(_ZERO_NONCE)).encryptor().update(bytes(4 * n))
    return np.frombuffer(stream, dtype="<u4").astype(np.int64)


def pair_sign(own: str, peer: str) -> int:
    """+1 if `own` sorts before `peer`, −1 after: the two ends of a pair add and subtract the same mask."""
    if own == peer:
        raise SecAggError(f"a site has no pair mask with itself ({own!r})")
    return 1 if own < peer else -1


def _residues(v: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise SecAggError(f"{what} must be a flat integer vector")
    a = a.astype(np.int64, copy=False)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= MODULUS):
        raise SecAggError(f"{what} must hold values in [0, 2^32)")
    return a


def add_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod 2^32 of two residue vectors."""
    x, y = _residues(a, "a"), _residues(b, "b")
    if x.shape != y.shape:
        raise SecAggError(f"vectors of different lengths: {x.size} and {y.size}")
    out: np.ndarray = (x + y) & _LOW
    return out


def sub_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a − b) mod 2^32 of two residue vectors (the & of a negative int64 is its two's-complement residue)."""
    x, y = _residues(a, "a"), _residues(b, "b")
    if x.shape != y.shape:
        raise SecAggError(f"vectors of different lengths: {x.size} and {y.size}")
    out: np.ndarray = (x - y) & _LOW
    return out


def mask(values: np.ndarray, self_seed: bytes, pair_seeds: Mapping[str, bytes], own: str) -> np.ndarray:
    """`values` + PRG(self_seed) + Σ_peer pair_sign(own, peer)·PRG(pair_seed) mod 2^32.

    Sums run in int64 and are reduced once at the end: each term is below 2^32, so even 2^30 peers stay
    below 2^63."""
    total = _residues(values, "values").copy()
    n = total.size
    total += prg(self_seed, n)
    for peer, seed in pair_seeds.items():
        if pair_sign(own, peer) > 0:
            total += prg(seed, n)
        else:
            total -= prg(seed, n)
    return total & _LOW


def unmask(total: np.ndarray, self_seeds: Sequence[bytes], dropped_pairs: Sequence[tuple[int, bytes]]) -> np.ndarray:
    """Σ of the survivors' plaintext vectors mod 2^32, from Σ of their masked vectors.

    `self_seeds`: every survivor's self seed. `dropped_pairs`: for each (survivor, dropped site) pair,
    (pair_sign(survivor, dropped), seed); that survivor added sign·PRG(seed), and the dropped site's opposite
    term never arrived, so it is taken out here."""
    out = _residues(total, "total").copy()
    n = out.size
    for seed in self_seeds:
        out -= prg(seed, n)
    for sign, seed in dropped_pairs:
        if sign not in (1, -1):
            raise SecAggError(f"a pair sign is +1 or -1, got {sign}")
        if sign > 0:
            out -= prg(seed, n)
        else:
            out += prg(seed, n)
    return out & _LOW


def to_signed(v: np.ndarray) -> np.ndarray:
    """The centered lift of residues mod 2^32 to [−2^31, 2^31) (int64)."""
    a = _residues(v, "vector")
    return np.where(a >= MODULUS // 2, a - MODULUS, a)
