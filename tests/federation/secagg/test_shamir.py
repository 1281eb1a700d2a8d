"""t-of-n sharing: any t shares rebuild a 16- or 32-byte secret, fewer are refused, and malformed or
conflicting shares are refused rather than silently interpolated into a wrong secret."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from Crypto.Protocol.SecretSharing import Shamir

from federation.secagg.errors import SecAggError
from federation.secagg.shamir import combine, split


@pytest.mark.parametrize("size", [16, 32])
def test_any_t_of_n_rebuild_the_secret(size: int) -> None:
    secret = os.urandom(size)
    n, t = 5, 3
    shares = split(secret, t, n)
    assert len(shares) == n
    assert all(len(s) == 2 + size for s in shares)
    assert [struct.unpack(">H", s[:2])[0] for s in shares] == [1, 2, 3, 4, 5]  # share i has index i + 1
    for chosen in itertools.permutations(shares, t):
        assert combine(list(chosen), t) == secret
    assert combine(shares, t) == secret  # more than t: the first t are used


@pytest.mark.parametrize("size", [16, 32])
def test_fewer_than_t_shares_are_refused(size: int) -> None:
    secret = os.urandom(size)
    shares = split(secret, 3, 5)
    for chosen in itertools.combinations(shares, 2):
        with pytest.raises(SecAggError, match="2 distinct shares, need 3"):
            combine(list(chosen), 3)
    with pytest.raises(SecAggError, match="need 3"):
        combine([shares[0]] * 3, 3)  # a repeated share counts once
    # Why the count is checked: the library interpolates whatever it is given, and 2 points of a degree-2
    # polynomial give some other field element, without complaint.
    points = [(i + 1, shares[i][2:18]) for i in range(2)]
    assert Shamir.combine(points, ssss=False) != secret[:16]


def test_threshold_one_and_threshold_n() -> None:
    secret = os.urandom(32)
    assert all(combine([s], 1) == secret for s in split(secret, 1, 3))
    shares = split(secret, 4, 4)
    assert combine(shares, 4) == secret
    with pytest.raises(SecAggError):
        combine(shares[:3], 4)


LONG = split(os.urandom(32), 2, 3)
SHORT = split(os.urandom(16), 2, 3)


@pytest.mark.parametrize(
    "shares",
    [
        [LONG[0][:-1], LONG[1]],
        [LONG[0] + b"\x00", LONG[1]],
        [b"\x00\x00" + LONG[0][2:], LONG[1]],
        [LONG[0], SHORT[1]],
        [LONG[0], LONG[0][:2] + bytes(32), LONG[1]],
        [LONG[0], "not bytes"],
        [],
    ],
    ids=["truncated", "extended", "index-0", "mixed-lengths", "conflicting", "not-bytes", "none"],
)
def test_malformed_shares_are_refused(shares: list[bytes]) -> None:
    with pytest.raises(SecAggError):
        combine(shares, 2)


def test_threshold_below_one_is_refused() -> None:
    with pytest.raises(SecAggError):
        combine(LONG, 0)


@pytest.mark.parametrize(
    ("secret", "t", "n"),
    [(bytes(15), 2, 3), (bytes(24), 2, 3), (bytes(32), 0, 3), (bytes(32), 4, 3), (bytes(32), 2, 2**16)],
)
def test_split_refuses_bad_arguments(secret: bytes, t: int, n: int) -> None:
    with pytest.raises(SecAggError):
        split(secret, t, n)
