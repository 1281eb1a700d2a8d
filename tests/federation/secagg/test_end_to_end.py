"""One round of secure aggregation worked through with the math alone, no network: four sites quantize and
noise their updates, mask them with a self seed and X25519-agreed pair seeds, and share their key and seed
t-of-4 (sealed to each holder); the aggregator sums what arrives and unmasks it, rebuilding the keys of sites
that dropped after masking. The unmasked sum must equal the survivors' plaintext sum exactly."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

from federation.secagg.discrete_gaussian import sample
from federation.secagg.errors import SecAggError
from federation.secagg.keys import agree, new_private_key, open_sealed, public_key, seal, share_ad
from federation.secagg.masking import add_mod, mask, pair_sign, unmask
from federation.secagg.quantize import Quantization, decode_sum, encode_mod, flatten, plan, quantize
from federation.secagg.shamir import combine, split

SITES = ["site-a", "site-b", "site-c", "site-d"]
TEMPLATE = {"layer.bias": np.zeros(7, dtype=np.float32), "layer.weight": np.zeros((13, 17), dtype=np.float32)}
DIM = 7 + 13 * 17
JOB, ROUND = "job-7", 5
MASK, SHARES = b"mask", b"shares"


@dataclass
class Site:
    name: str
    private: bytes
    self_seed: bytes
    update: np.ndarray  # the clipped float update
    noise: np.ndarray
    encoded: np.ndarray  # quantized + noise, mod 2^32
    masked: np.ndarray


def _round(q: Quantization) -> tuple[dict[str, Site], dict[str, dict[str, bytes]], dict[str, dict[str, bytes]]]:
    """Every site's vectors, plus the key and seed shares each holder ended up with (holder → owner → share)."""
    rng = np.random.default_rng()
    keys = {s: new_private_key() for s in SITES}
    public = {s: public_key(keys[s]) for s in SITES}
    sites = {}
    for i, name in enumerate(SITES):
        raw = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in TEMPLATE.items()}
        update = flatten(raw)
        update *= (0.25 + 0.25 * i) * q.clip_norm / np.linalg.norm(update)  # norms c/4 … c
        pair_seeds = {p: agree(keys[name], public[p], MASK) for p in SITES if p != name}
        for peer, seed in pair_seeds.items():  # both ends of every pair derive the same seed
            assert seed == agree(keys[peer], public[name], MASK)
        self_seed = os.urandom(32)
        noise = sample(DIM, q.site_sigma)
        encoded = encode_mod(quantize(update, q) + noise)
        sites[name] = Site(name, keys[name], self_seed, update, noise, encoded,
                           mask(encoded, self_seed, pair_seeds, name))

    def deliver(owner: str, holder: str, share: bytes) -> bytes:
        """Sealed owner → holder under their agreed key and relayed by the aggregator, which cannot read it."""
        if owner == holder:
            return share
        ad = share_ad(JOB, ROUND, owner, holder)
        relayed = seal(agree(keys[owner], public[holder], SHARES), share, ad)
        return open_sealed(agree(keys[holder], public[owner], SHARES), relayed, ad)

    key_shares: dict[str, dict[str, bytes]] = {h: {} for h in SITES}
    seed_shares: dict[str, dict[str, bytes]] = {h: {} for h in SITES}
    for owner in SITES:
        for i, share in enumerate(split(keys[owner], q.threshold, 4)):
            key_shares[SITES[i]][owner] = deliver(owner, SITES[i], share)
        for i, share in enumerate(split(sites[owner].self_seed, q.threshold, 4)):
            seed_shares[SITES[i]][owner] = deliver(owner, SITES[i], share)
    return sites, key_shares, seed_shares


def _aggregate(q: Quantization, sites: dict[str, Site], key_shares: dict[str, dict[str, bytes]],
               seed_shares: dict[str, dict[str, bytes]], dropped: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the unmasked sum, the sum of the survivors' masked vectors), from survivors' shares only."""
    survivors = [s for s in SITES if s not in dropped]
    total = np.zeros(DIM, dtype=np.int64)
    for s in survivors:
        total = add_mod(total, sites[s].masked)
    self_seeds = [combine([seed_shares[h][s] for h in survivors], q.threshold) for s in survivors]
    assert self_seeds == [sites[s].self_seed for s in survivors]
    dropped_pairs = []
    for d in sorted(dropped):
        private = combine([key_shares[h][d] for h in survivors], q.threshold)
        assert private == sites[d].private and public_key(private) == public_key(sites[d].private)
        for s in survivors:
            dropped_pairs.append((pair_sign(s, d), agree(private, public_key(sites[s].private), MASK)))
    return unmask(total, self_seeds, dropped_pairs), total


def _plain_sum(sites: dict[str, Site], names: list[str]) -> np.ndarray:
    out = np.zeros(DIM, dtype=np.int64)
    for s in names:
        out = add_mod(out, sites[s].encoded)
    return out


@pytest.mark.parametrize(("threshold", "dropped"), [(3, set()), (3, {"site-b"}), (2, {"site-a", "site-c"}),
                                                    (2, {"site-d"})])
def test_unmasked_sum_is_exactly_the_survivors_sum(threshold: int, dropped: set[str]) -> None:
    q = plan(clip_norm=1.0, dim=DIM, sites=4, threshold=threshold, noise_multiplier=1.0)
    sites, key_shares, seed_shares = _round(q)
    survivors = [s for s in SITES if s not in dropped]
    unmasked, masked_total = _aggregate(q, sites, key_shares, seed_shares, dropped)
    assert np.array_equal(unmasked, _plain_sum(sites, survivors))
    if dropped:  # without the dropped sites' pair seeds the masks do not cancel
        self_only = unmask(masked_total, [sites[s].self_seed for s in survivors], [])
        assert not np.array_equal(self_only, _plain_sum(sites, survivors))


def test_too_few_survivors_cannot_rebuild_a_dropped_key() -> None:
    q = plan(clip_norm=1.0, dim=DIM, sites=4, threshold=3, noise_multiplier=1.0)
    sites, key_shares, seed_shares = _round(q)
    with pytest.raises(SecAggError, match="need 3"):
        _aggregate(q, sites, key_shares, seed_shares, {"site-a", "site-b"})


@pytest.mark.parametrize("z", [0.0, 1.0])
@pytest.mark.parametrize("dropped", [set(), {"site-c"}])
def test_decoded_sum_is_the_mean_within_the_rounding(z: float, dropped: set[str]) -> None:
    """Each site's rounding moves a coordinate by under one unit, so the decoded mean is within 1/scale of the
    true mean of the updates plus the summed noise (which is exactly zero at z = 0)."""
    q = plan(clip_norm=1.0, dim=DIM, sites=4, threshold=3, noise_multiplier=z)
    sites, key_shares, seed_shares = _round(q)
    survivors = [s for s in SITES if s not in dropped]
    unmasked, _ = _aggregate(q, sites, key_shares, seed_shares, dropped)
    decoded = decode_sum(unmasked, q, len(survivors))
    mean = np.mean([sites[s].update for s in survivors], axis=0)
    noise = np.sum([sites[s].noise for s in survivors], axis=0) / q.scale / len(survivors)
    assert np.max(np.abs(decoded - mean - noise)) < 1 / q.scale
    if z == 0.0:
        assert not noise.any()
    else:
        summed = noise * q.scale * len(survivors)  # 228 draws: the std is within 30 % (6 standard errors)
        assert np.std(summed) == pytest.approx(q.site_sigma * len(survivors) ** 0.5, rel=0.3)
