"""The site's side of a secure-aggregation round as plain computation, for sites that a program plays rather than an
agent: the scale benchmark's simulated sites and the protocol tests' participants share it, so the benchmark
measures the protocol the tests check. No transport here: each caller sends the messages its own way.

The math is `federation.secagg`'s (X25519/HKDF, Shamir t-of-n, ChaCha20-Poly1305 sealed shares, PRG masks mod 2^32),
the messages `federation.secagg.messages`'. What it leaves out of a real agent (`agent.secagg`): the durable
never-both record and the roster's signature check, which callers that need them do themselves.
"""

from __future__ import annotations

import json
import os

import numpy as np

from federation.messages import RoundTask, UpdateEnvelope
from federation.secagg import keys, masking, shamir
from federation.secagg.job import MASKED, mask_purpose, share_purpose
from federation.secagg.messages import MaskRoster, Reveal, ShareBundle, UnmaskRequest, UnmaskWork, b64, unb64
from federation.tensors import encode, sha256_hex


class SecureSite:
    """One site's keys for a secure job: its per-job share key, and each round's mask key and self-mask seed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.share_private = keys.new_private_key()
        self.mask_private: dict[int, bytes] = {}
        self.seed: dict[int, bytes] = {}

    @property
    def share_key(self) -> str:
        """The public share key the site announces when it accepts the job (`SiteEvent.share_key`)."""
        return b64(keys.public_key(self.share_private))

    def bundle(self, task: RoundTask, threshold: int, num_samples: int = 10) -> ShareBundle:
        """A fresh mask key and self-mask seed for the task's round, each split t-of-n, one sealed pair of shares
        per participant the task lists (the site itself included); `num_samples` is the record count its masked
        upload's envelope will claim (the weight of a sample-weighted sum)."""
        if task.share_keys is None:
            raise ValueError(f"round {task.round}'s task lists no share keys: not a secure train round")
        rnd = task.round
        self.mask_private[rnd], self.seed[rnd] = keys.new_private_key(), os.urandom(32)
        participants = sorted(task.share_keys)
        key_shares = shamir.split(self.mask_private[rnd], threshold, len(participants))
        seed_shares = shamir.split(self.seed[rnd], threshold, len(participants))
        sealed = {
            p: b64(keys.seal(keys.agree(self.share_private, unb64(task.share_keys[p]), share_purpose(task.job_id)),
                             key_shares[i] + seed_shares[i], keys.share_ad(task.job_id, rnd, self.name, p)))
            for i, p in enumerate(participants)
        }
        return ShareBundle(job_id=task.job_id, round=rnd, site=self.name,
                           mask_key=b64(keys.public_key(self.mask_private[rnd])), num_samples=num_samples,
                           seed_commitment=sha256_hex(self.seed[rnd]), shares=sealed)

    def mask(self, roster: MaskRoster, values: np.ndarray) -> np.ndarray:
        """`values` (residues mod 2^32) masked with this round's self seed and a pair seed per other roster site."""
        rnd = roster.round
        seeds = {p: keys.agree(self.mask_private[rnd], unb64(k), mask_purpose(roster.job_id, rnd))
                 for p, k in roster.mask_keys.items() if p != self.name}
        return masking.mask(values, self.seed[rnd], seeds, self.name)

    def reveal(self, work: UnmaskWork, share_keys: dict[str, str]) -> Reveal:
        """Open the inbox and answer the unmask request: survivors' self-mask shares, dropped sites' mask-key
        shares. `share_keys` are the round task's (every sender's per-job share key)."""
        request = UnmaskRequest.model_validate(json.loads(work.request)["message"])
        opened: dict[str, tuple[bytes, bytes]] = {}
        for sender, blob in work.inbox.items():
            plain = keys.open_sealed(
                keys.agree(self.share_private, unb64(share_keys[sender]), share_purpose(request.job_id)),
                unb64(blob), keys.share_ad(request.job_id, request.round, sender, self.name))
            half = len(plain) // 2
            opened[sender] = (plain[:half], plain[half:])
        return Reveal(job_id=request.job_id, round=request.round, site=self.name,
                      self_mask_shares={s: b64(opened[s][1]) for s in request.survivors},
                      mask_key_shares={s: b64(opened[s][0]) for s in request.dropped})


def masked_upload(job_id: str, rnd: int, site: str, masked: np.ndarray,
                  num_samples: int = 10) -> tuple[bytes, UpdateEnvelope]:
    """The body and envelope of a masked update, sent on the usual update path: one int64 tensor. The envelope
    carries no evaluation and no ε (an agent adds both; neither the protocol's checks nor its cost depend on them)."""
    body = encode({MASKED: masked.astype(np.int64)})
    env = UpdateEnvelope(job_id=job_id, round=rnd, site=site, num_samples=num_samples, sha256=sha256_hex(body),
                         evaluation=None, train_loss=0.5, epsilon=None)
    return body, env
