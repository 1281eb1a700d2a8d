"""Our interpolation at 0 in GF(2^128) agrees with pycryptodome's field and its `Shamir.combine`, which it replaces
on the aggregator's side for speed."""

from __future__ import annotations

import os
import random

import pytest
from Crypto.Protocol.SecretSharing import Shamir, _Element

from federation.secagg import gf128


def _random_element() -> int:
    return int.from_bytes(os.urandom(16), "big")


def test_multiplication_and_inverse_match_pycryptodome() -> None:
    for _ in range(200):
        a, b = _random_element(), _random_element() or 1
        assert gf128.mul(a, b) == int(_Element(a) * _Element(b))  # type: ignore[operator]
        assert gf128.inv(b) == int(_Element(b).inverse())
        assert gf128.mul(b, gf128.inv(b)) == 1
    assert gf128.mul(0, _random_element()) == 0
    assert gf128.inv(1) == 1


@pytest.mark.parametrize("t", [1, 2, 4, 9, 51])
def test_interpolation_matches_shamir_combine(t: int) -> None:
    secret = os.urandom(16)
    shares = random.sample(Shamir.split(t, t + 5, secret, ssss=False), t)
    points = [(i, int.from_bytes(s, "big")) for i, s in shares]
    value = gf128.interpolate_at_zero(points).to_bytes(16, "big")
    assert value == secret == Shamir.combine(shares, ssss=False)


def test_bad_indices_and_zero_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct non-zero"):
        gf128.lagrange_at_zero((1, 1))
    with pytest.raises(ValueError, match="distinct non-zero"):
        gf128.lagrange_at_zero((0, 2))
    with pytest.raises(ValueError, match="non-zero field element"):
        gf128.inv(0)
