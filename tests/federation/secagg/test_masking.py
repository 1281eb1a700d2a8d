"""Masking mod 2^32: the PRG is deterministic per seed, pair masks cancel, the arithmetic wraps exactly, and a
masked vector looks uniform even when what it hides is all zeros."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from federation.secagg.errors import SecAggError
from federation.secagg.keys import agree, public_key
from federation.secagg.masking import (
    MODULUS,
    add_mod,
    mask,
    pair_sign,
    prg,
    sub_mod,
    to_signed,
    unmask,
)

SEED = bytes(range(32))


def test_prg_is_deterministic_and_in_range() -> None:
    a = prg(SEED, 10_000)
    assert a.dtype == np.int64 and a.shape == (10_000,)
    assert np.array_equal(a, prg(SEED, 10_000))
    assert np.array_equal(a[:100], prg(SEED, 100))  # one keystream, read as far as needed
    assert a.min() >= 0 and a.max() < MODULUS
    assert not np.array_equal(a, prg(bytes(32), 10_000))
    short = prg(SEED[:16], 10_000)  # a 16-byte seed is stretched, not zero-padded
    assert short.min() >= 0 and short.max() < MODULUS
    assert not np.array_equal(short, prg(SEED[:16] + bytes(16), 10_000))
    assert prg(SEED, 0).shape == (0,)


@pytest.mark.parametrize("seed", [b"", bytes(15), bytes(24), bytes(33)])
def test_prg_refuses_other_seed_lengths(seed: bytes) -> None:
    with pytest.raises(SecAggError):
        prg(seed, 4)


def test_pair_sign_is_antisymmetric() -> None:
    assert pair_sign("site-a", "site-b") == 1
    assert pair_sign("site-b", "site-a") == -1
    with pytest.raises(SecAggError):
        pair_sign("site-a", "site-a")


def test_modular_helpers_wrap_and_refuse_non_residues() -> None:
    top = np.array([MODULUS - 1, 5], dtype=np.int64)
    assert add_mod(top, np.array([1, 7])).tolist() == [0, 12]
    assert sub_mod(np.array([0, 7]), np.array([1, 5])).tolist() == [MODULUS - 1, 2]
    assert to_signed(np.array([0, 2**31 - 1, 2**31, MODULUS - 1])).tolist() == [0, 2**31 - 1, -(2**31), -1]
    for bad in (np.array([-1, 0]), np.array([MODULUS, 0]), np.array([0.5, 1.0]), np.zeros((2, 1), dtype=np.int64)):
        with pytest.raises(SecAggError):
            add_mod(bad, np.array([0, 0]))
    with pytest.raises(SecAggError, match="lengths"):
        sub_mod(np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64))


def _key(name: str) -> bytes:
    """A fixed private key per name, so the statistical tests below give the same verdict on every run."""
    return hashlib.sha256(name.encode()).digest()


SITES = ["site-a", "site-b", "site-c"]
PAIRS = {s: {p: agree(_key(s), public_key(_key(p)), b"mask") for p in SITES if p != s} for s in SITES}
SELF = {s: hashlib.sha256(b"self " + s.encode()).digest() for s in SITES}


def test_pair_masks_cancel_in_the_sum() -> None:
    rng = np.random.default_rng(1)
    values = {s: rng.integers(0, MODULUS, 5000) for s in SITES}
    total = np.zeros(5000, dtype=np.int64)
    for s in SITES:
        total = add_mod(total, mask(values[s], SELF[s], PAIRS[s], s))
    plain = np.zeros(5000, dtype=np.int64)
    for s in SITES:
        plain = add_mod(plain, values[s])
    assert np.array_equal(unmask(total, [SELF[s] for s in SITES], []), plain)
    assert not np.array_equal(unmask(total, [SELF[s] for s in SITES[1:]], []), plain)  # a self mask is left


def test_mask_refuses_values_outside_the_ring_and_bad_signs() -> None:
    with pytest.raises(SecAggError):
        mask(np.array([-1, 2]), SELF["site-a"], {}, "site-a")
    with pytest.raises(SecAggError, match="sign"):
        unmask(np.zeros(2, dtype=np.int64), [], [(0, SEED)])


N = 100_000
P_MIN = 1e-4


def _top_byte_p(v: np.ndarray) -> float:
    counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def _ks_p(v: np.ndarray) -> float:
    return float(stats.kstest(v / MODULUS, "uniform").pvalue)


@pytest.mark.parametrize("constant", [0, 12345])
def test_a_masked_constant_vector_looks_uniform(constant: int) -> None:
    """Chi-square on the top 8 bits and Kolmogorov–Smirnov on the whole value, over 100k coordinates of a
    vector that hides nothing but one constant. The same tests must reject the unmasked vector, or they would
    not be testing anything."""
    plain = np.full(N, constant, dtype=np.int64)
    masked = mask(plain, SELF["site-a"], PAIRS["site-a"], "site-a")
    assert _top_byte_p(masked) > P_MIN
    assert _ks_p(masked) > P_MIN
    assert _top_byte_p(plain) < P_MIN
    assert _ks_p(plain) < P_MIN


def test_a_weak_mask_is_caught() -> None:
    """Power check: a mask with only 16 random low bits leaves the top byte of a zero vector at 0."""
    weak = prg(SEED, N) & 0xFFFF
    assert _top_byte_p(weak) < P_MIN
    assert _ks_p(weak) < P_MIN
