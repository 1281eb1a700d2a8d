"""The aggregator's part of a secure-aggregation round: relay sealed shares, freeze who masks against whom, sum
the masked updates, ask the survivors for the shares that remove the masks, and unmask only the sum.

Plain state and checks, no I/O: `aggregator.secure_rounds` stores each message before acting on it and rebuilds
this state from the store after a restart. Every message is checked against what the round already froze, so a
site (even one with a valid certificate) cannot change its shares, claim another's, or reveal a different split.
The aggregator learns the sum of at least `threshold` updates and nothing else (docs/secure-aggregation.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np

from aggregator.validation import Rejection
from federation.jobs import JobSpec
from federation.models import Weights
from federation.secagg import keys, masking, quantize, shamir
from federation.secagg.errors import SecAggError
from federation.secagg.job import MASKED, divisor, job_quantization, mask_purpose, masked_template, model_dim
from federation.secagg.messages import MaskRoster, Reveal, ShareBundle, UnmaskRequest, unb64
from federation.tensors import check_frame, decode, sha256_hex

# Subsets of reveals tried when a reconstruction fails its check (a site sent a bad share): bounded work.
MAX_SUBSETS = 64


@dataclass
class SecureRound:
    job_id: str
    round: int
    threshold: int
    participants: list[str]  # the sites whose share keys the round's task listed
    template: Weights  # the global model's layout: the unmasked mean takes it
    bundles: dict[str, ShareBundle] = field(default_factory=dict)
    roster: MaskRoster | None = None
    roster_signed: bytes | None = None
    unmask: UnmaskRequest | None = None
    unmask_signed: bytes | None = None
    reveals: dict[str, Reveal] = field(default_factory=dict)
    total: np.ndarray | None = None  # Σ of the masked uploads mod 2^32
    uploaded: set[str] = field(default_factory=set)
    roster_ready: asyncio.Event = field(default_factory=asyncio.Event)
    unmask_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def dim(self) -> int:
        return model_dim(self.template)

    def quantization(self, spec: JobSpec) -> quantize.Quantization:
        return job_quantization(spec, self.dim)

    # ---------------------------------------------------------------- share
    def check_bundle(self, b: ShareBundle) -> bool:
        """Whether `b` is new (False: the same bundle again). Raises `Rejection` for anything else."""
        if b.site not in self.participants:
            raise Rejection("not_a_participant", f"{b.site} is not a participant of round {self.round}", 403)
        if set(b.shares) != set(self.participants):
            missing = sorted(set(self.participants) - set(b.shares))
            extra = sorted(set(b.shares) - set(self.participants))
            raise Rejection("shares_mismatch", f"a share for every participant is needed; missing {missing}, "
                                               f"not participants {extra}")
        earlier = self.bundles.get(b.site)
        if earlier is not None:
            if earlier != b:
                raise Rejection("duplicate_conflict", "different shares were already accepted for this round", 409)
            return False
        if self.roster is not None:
            raise Rejection("roster_frozen", f"round {self.round}'s roster was frozen without {b.site}", 409)
        return True

    def roster_for(self) -> dict[str, str]:
        return {s: self.bundles[s].mask_key for s in sorted(self.bundles)}

    # ---------------------------------------------------------------- masked uploads
    def check_upload(self, site: str, num_samples: int) -> None:
        if self.roster is None:
            raise Rejection("roster_not_frozen", f"round {self.round} has no roster yet: shares come first", 409)
        if site not in self.roster.mask_keys:
            raise Rejection("not_in_roster", f"{site} is not in round {self.round}'s roster (its shares were late)",
                            409)
        if self.unmask is not None:
            raise Rejection("late_update", f"round {self.round} is unmasking already", 409)
        if num_samples != self.roster.num_samples[site]:
            raise Rejection("num_samples_mismatch", f"the envelope says {num_samples} records; the shares said "
                                                    f"{self.roster.num_samples[site]}, the weight the sum uses")

    def add_masked(self, site: str, values: np.ndarray) -> None:
        self.total = values.copy() if self.total is None else masking.add_mod(self.total, values)
        self.uploaded.add(site)

    # ---------------------------------------------------------------- unmask
    def survivors_and_dropped(self) -> tuple[list[str], list[str]]:
        assert self.roster is not None
        survivors = sorted(self.uploaded)
        return survivors, sorted(set(self.roster.mask_keys) - self.uploaded)

    def inbox(self, site: str) -> dict[str, str]:
        """The sealed shares addressed to `site` by every roster site (the aggregator cannot open them)."""
        assert self.roster is not None
        return {sender: self.bundles[sender].shares[site] for sender in self.roster.mask_keys}

    def check_reveal(self, r: Reveal) -> bool:
        """Whether `r` is new. A reveal answers what the unmask request asked of every site and no more: self-mask
        shares of survivors and mask-key shares of dropped sites, never both for one site. It may leave out a share
        that did not open at the site (tampered or replayed); reconstruction uses the reveals that hold one."""
        u = self.unmask
        if u is None:
            raise Rejection("round_not_unmasking", f"round {self.round} is not unmasking", 409)
        if r.site not in u.survivors:
            raise Rejection("not_a_survivor", f"{r.site} is not a survivor of round {self.round}", 403)
        if not set(r.self_mask_shares) <= set(u.survivors) or not set(r.mask_key_shares) <= set(u.dropped):
            raise Rejection("reveal_mismatch", "a reveal holds survivors' self-mask shares and dropped sites' "
                                               "mask-key shares, nothing else")
        earlier = self.reveals.get(r.site)
        if earlier is not None:
            if earlier != r:
                raise Rejection("reveal_conflict", "a different reveal was already accepted for this round", 409)
            return False
        return True

    def unmasked_mean(self, spec: JobSpec) -> Weights | None:
        """The mean of the survivors' updates once enough reveals are in; None before. Raises `SecAggError` when no
        subset of the reveals reconstructs secrets that pass their checks."""
        u = self.unmask
        if u is None or self.total is None or len(self.reveals) < self.threshold:
            return None
        try:
            seeds = [self._secret(s, "self") for s in u.survivors]
            keys_of = {d: self._secret(d, "key") for d in u.dropped}
        except SecAggError:
            if len(self.reveals) < len(u.survivors):
                return None  # a share left out or a bad one: the reveals still to come may fill in
            raise
        pairs: list[tuple[int, bytes]] = []
        assert self.roster is not None
        purpose = mask_purpose(self.job_id, self.round)
        for dropped in u.dropped:
            key = keys_of[dropped]
            for s in u.survivors:
                seed = keys.agree(key, unb64(self.roster.mask_keys[s]), purpose)
                pairs.append((masking.pair_sign(s, dropped), seed))
        total = masking.unmask(self.total, seeds, pairs)
        mean = quantize.decode_sum(total, self.quantization(spec), 1) / divisor(spec, self.roster.num_samples,
                                                                                list(u.survivors))
        return quantize.unflatten(mean, self.template)

    def _secret(self, site: str, kind: str) -> bytes:
        """Reconstruct `site`'s self-mask seed or mask key from `threshold` reveals, checked against its commitment
        (the seed's hash, the key's public half); other subsets are tried when one fails (a bad share)."""
        assert self.roster is not None
        held = [(r.self_mask_shares if kind == "self" else r.mask_key_shares).get(site)
                for _, r in sorted(self.reveals.items())]
        shares = [unb64(t) for t in held if t is not None]
        if len(shares) < self.threshold:
            raise SecAggError(f"{len(shares)} shares of {site}'s secret were revealed, fewer than the threshold "
                              f"{self.threshold}")
        for subset in itertools.islice(itertools.combinations(shares, self.threshold), MAX_SUBSETS):
            try:
                secret = shamir.combine(list(subset), self.threshold)
            except SecAggError:
                continue
            if kind == "self" and hashlib.sha256(secret).hexdigest() == self.bundles[site].seed_commitment:
                return secret
            if kind == "key" and keys.public_key(secret) == unb64(self.roster.mask_keys[site]):
                return secret
        raise SecAggError(f"the revealed shares of {site}'s {'self-mask seed' if kind == 'self' else 'mask key'} "
                          "reconstruct nothing that matches its commitment")


def check_masked(body: bytes, claimed_sha: str, dim: int) -> np.ndarray:
    """Decode a masked upload: exactly one int64 vector of the model's size, every value in [0, 2^32). A masked
    update is uniformly random to the aggregator, so its size, layout and range are all that can be checked."""
    if sha256_hex(body) != claimed_sha:
        raise Rejection("hash_mismatch", "the body's sha256 differs from the envelope's")
    template = masked_template(dim)
    try:
        check_frame(body, template)
        tensors = decode(body)
    except ValueError as exc:  # PayloadError, HeaderTooLarge, SizeMismatch
        raise Rejection("wrong_layout", f"a masked update is one int64 tensor {MASKED!r} of {dim} values: {exc}") \
            from None
    v = tensors.get(MASKED)
    if set(tensors) != {MASKED} or v is None or v.dtype != np.int64 or v.shape != (dim,):
        raise Rejection("wrong_layout", f"a masked update is one int64 tensor {MASKED!r} of {dim} values")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= masking.MODULUS):
        raise Rejection("out_of_range", f"masked values lie in [0, 2^{masking.MODULUS_BITS})")
    return v
