"""Key agreement and sealed shares: both ends derive one secret, a hostile peer key is refused, and a share opens
only under its own key, job, round, sender and recipient, byte for byte."""

from __future__ import annotations

import pytest

from federation.secagg.errors import SecAggError
from federation.secagg.keys import (
    KEY_BYTES,
    agree,
    new_private_key,
    open_sealed,
    public_key,
    seal,
    share_ad,
)


def test_both_ends_agree_and_purposes_are_independent() -> None:
    a, b, c = new_private_key(), new_private_key(), new_private_key()
    assert len(a) == len(public_key(a)) == KEY_BYTES
    ab = agree(a, public_key(b), b"mask")
    assert ab == agree(b, public_key(a), b"mask")
    assert len(ab) == KEY_BYTES
    assert agree(a, public_key(b), b"shares") != ab
    assert agree(a, public_key(c), b"mask") != ab
    assert public_key(a) == public_key(a)  # deterministic


@pytest.mark.parametrize("peer", [bytes(32), (1).to_bytes(32, "little")], ids=["zero", "one"])
def test_low_order_peer_key_is_refused(peer: bytes) -> None:
    """X25519 with u = 0 or u = 1 gives the all-zero secret whatever the private key: a peer choosing it would
    know the pair's mask."""
    with pytest.raises(SecAggError, match="refused"):
        agree(new_private_key(), peer, b"mask")


@pytest.mark.parametrize("peer", [b"", bytes(31), bytes(33)])
def test_malformed_peer_key_is_refused(peer: bytes) -> None:
    with pytest.raises(SecAggError):
        agree(new_private_key(), peer, b"mask")


def test_malformed_private_key_and_empty_purpose_are_refused() -> None:
    with pytest.raises(SecAggError):
        public_key(bytes(31))
    with pytest.raises(SecAggError):
        agree(bytes(16), public_key(new_private_key()), b"mask")
    with pytest.raises(SecAggError, match="purpose"):
        agree(new_private_key(), public_key(new_private_key()), b"")


KEY = bytes(range(32))
AD = share_ad("job-1", 3, "site-a", "site-b")


def test_seal_and_open_round_trip_with_fresh_nonces() -> None:
    blob = seal(KEY, b"a share", AD)
    assert open_sealed(KEY, blob, AD) == b"a share"
    assert seal(KEY, b"a share", AD) != blob  # a random nonce each time
    assert open_sealed(KEY, seal(KEY, b"", AD), AD) == b""


@pytest.mark.parametrize(
    "other",
    [
        share_ad("job-1", 4, "site-a", "site-b"),  # replayed into another round
        share_ad("job-1", 3, "site-c", "site-b"),  # claimed by another sender
        share_ad("job-1", 3, "site-a", "site-c"),  # handed to another recipient
        share_ad("job-1", 3, "site-b", "site-a"),  # sender and recipient swapped
        share_ad("job-2", 3, "site-a", "site-b"),  # another job
    ],
    ids=["round", "sender", "recipient", "swapped", "job"],
)
def test_wrong_associated_data_is_refused(other: bytes) -> None:
    blob = seal(KEY, b"a share", AD)
    with pytest.raises(SecAggError, match="does not open"):
        open_sealed(KEY, blob, other)


def test_every_tampered_byte_and_a_wrong_key_are_refused() -> None:
    blob = seal(KEY, b"0123456789abcdef", AD)
    for i in range(len(blob)):  # nonce, ciphertext and tag alike
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(SecAggError):
            open_sealed(KEY, bytes(tampered), AD)
    with pytest.raises(SecAggError):
        open_sealed(bytes(32), blob, AD)
    with pytest.raises(SecAggError, match="too short"):
        open_sealed(KEY, blob[:27], AD)
    with pytest.raises(SecAggError):
        seal(bytes(16), b"x", AD)


def test_share_ad_is_unambiguous() -> None:
    """Length prefixes: moving a character from one field to the next changes the encoding."""
    assert share_ad("job", 1, "ab", "c") != share_ad("job", 1, "a", "bc")
    assert share_ad("job-", 1, "a", "b") != share_ad("job", 1, "-a", "b")
    assert share_ad("job", 1, "a", "b") != share_ad("job", 256, "a", "b")
    assert share_ad("job", 1, "a", "b") == share_ad("job", 1, "a", "b")
    for bad in (-1, 2**64):
        with pytest.raises(SecAggError):
            share_ad("job", bad, "a", "b")
    with pytest.raises(SecAggError):
        share_ad("job", 1, "", "b")
