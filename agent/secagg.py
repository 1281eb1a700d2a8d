"""The site's side of a secure-aggregation round (`federation.secagg.messages` has the protocol): plain state, no I/O
beyond the share-key secret, one job and round each.

Keys. A site has one X25519 *share key* per job, to which its peers seal the Shamir shares they send it. It is
derived, not stored: HKDF-SHA256 of a 32-byte master secret kept in `<state dir>/secagg.key` (owner-only, made on
first use), with the job id in `info`. An agent that restarts therefore opens the same inbox and repeats the same
`share_key` when it answers an offer again. Per round a site makes a fresh *mask key* pair and a 32-byte *self-mask
seed*; these live in memory only (`SecureRound`). An agent that crashes between posting its shares and uploading its
masked update has lost them: it is a dropout for that round, which the protocol handles (its peers reveal shares of
its mask key, the aggregator removes its pairwise masks, its update is simply not in the sum).

Trust. The share keys reach the site in the signed `RoundTask`: the aggregator vouches for them (as Bonawitz et
al.'s server-mediated PKI does), so a site checks that its own key is the one listed and that every participant is a
site of the job. What stops an aggregator from collecting both kinds of share of one site (and so unmasking that
site's individual update) is the never-both rule: a site reveals for one round only one split of the roster into
survivors and dropped sites, and only when at least the job's threshold of sites survived (threshold > n/2, so two
disjoint groups of revealers cannot each reach it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.secagg import keys, masking, shamir
from federation.secagg.errors import SecAggError
from federation.secagg.job import mask_purpose, share_purpose
from federation.secagg.messages import MaskRoster, Reveal, ShareBundle, UnmaskRequest, UnmaskWork, b64, unb64

MASTER_BYTES = 32
SHARE_KEY_INFO = b"fedsilo/secagg/share-key/v1/"
KEY_FILE = "secagg.key"


class SecAggRefusedError(Exception):
    """The site will not take this step of the protocol: what it was asked could reveal an individual update, or
    does not match what the signed task and roster said. Nothing is sent."""


class ExcludedError(SecAggRefusedError):
    """This site is not, or no longer, part of the round's masking (not in the roster, or its round secrets were
    lost in a restart): a dropout of this round. Its update is not released, nor charged."""


class ShareKeys:
    """The site's per-job share keys, derived from one master secret on disk (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._master: bytes | None = None

    def _secret(self) -> bytes:
        if self._master is None:
            self._master = load_or_create_master(self.path)
        return self._master

    def private(self, job_id: str) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=keys.KEY_BYTES, salt=None,
                    info=SHARE_KEY_INFO + job_id.encode())
        return hkdf.derive(self._secret())

    def public(self, job_id: str) -> str:
        """The job's share public key as it travels (`SiteEvent.share_key`, `RoundTask.share_keys`)."""
        return b64(keys.public_key(self.private(job_id)))


def load_or_create_master(path: Path) -> bytes:
    """The master secret: read, or made from os.urandom and written owner-only (0600) with O_EXCL so two starts
    cannot write two. A file of another length is refused, not replaced: replacing it would change every running
    job's share key and strand the shares peers sealed to it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = os.urandom(MASTER_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_master(path)
        try:
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        return secret
    if len(data) != MASTER_BYTES:
        raise SecAggError(f"{path} holds {len(data)} bytes, not the {MASTER_BYTES} of a secure-aggregation master "
                          "secret; refusing to replace it (it derives the share keys of running jobs)")
    return data


@dataclass(frozen=True)
class RevealOutcome:
    """A reveal, and the senders whose share failed to open (replayed, reordered or corrupted), left out of it."""

    reveal: Reveal
    unopened: dict[str, str] = field(default_factory=dict)  # sender → why


class SecureRound:
    """One round of one job at this site: the fresh mask key and self-mask seed, the shares of both, the mask.

    `share_keys` is `RoundTask.share_keys` (every participant, this site included), `sites` the job's sites."""

    def __init__(self, site: str, job_id: str, rnd: int, threshold: int, share_private: bytes,
                 share_keys: Mapping[str, str], sites: list[str], num_samples: int = 1) -> None:
        """`num_samples`: the records behind this site's update, its weight in a sample-weighted sum."""
        if site not in share_keys:
            raise SecAggRefusedError(f"the task's share keys do not list this site ({site})")
        if share_keys[site] != b64(keys.public_key(share_private)):
            raise SecAggRefusedError("the task lists another share key for this site than its own: shares sealed "
                                     "to it could be opened by whoever holds that key")
        strangers = sorted(set(share_keys) - set(sites))
        if strangers:
            raise SecAggRefusedError(f"the task's share keys name sites that are not in the job: {strangers}")
        if len(share_keys) < threshold:
            raise SecAggRefusedError(f"{len(share_keys)} participants, below the job's threshold {threshold}")
        self.site, self.job_id, self.round, self.threshold = site, job_id, rnd, threshold
        self.num_samples = num_samples
        self._share_private = share_private
        self._share_keys = dict(share_keys)
        self._mask_private = keys.new_private_key()
        self._seed = os.urandom(32)

    @property
    def mask_key(self) -> str:
        return b64(keys.public_key(self._mask_private))

    def bundle(self) -> ShareBundle:
        """Shares of the mask key and the seed, participant i (sorted) getting Shamir index i+1, each sealed to its
        recipient's share key with the AD naming job, round, sender and recipient. Plaintext: mask-key share ‖
        seed share (both of 32-byte secrets, so of equal length: the reader splits it in half)."""
        participants = sorted(self._share_keys)
        n = len(participants)
        key_shares = shamir.split(self._mask_private, self.threshold, n)
        seed_shares = shamir.split(self._seed, self.threshold, n)
        sealed: dict[str, str] = {}
        for peer, key_share, seed_share in zip(participants, key_shares, seed_shares, strict=True):
            box = keys.agree(self._share_private, unb64(self._share_keys[peer]), share_purpose(self.job_id))
            ad = keys.share_ad(self.job_id, self.round, self.site, peer)
            sealed[peer] = b64(keys.seal(box, key_share + seed_share, ad))
        return ShareBundle(job_id=self.job_id, round=self.round, site=self.site, mask_key=self.mask_key,
                           num_samples=self.num_samples, seed_commitment=hashlib.sha256(self._seed).hexdigest(),
                           shares=sealed)

    def check_roster(self, roster: MaskRoster) -> None:
        """Refuse a roster this site must not mask against: another round's, one without this site or with another
        mask key for it (its shares were of a key this agent no longer has: a restart made it a dropout), one with
        sites that were not participants, or fewer sites than the threshold the noise is sized for."""
        if (roster.job_id, roster.round) != (self.job_id, self.round):
            raise SecAggRefusedError(f"a roster for {roster.job_id} round {roster.round}, not {self.job_id} round "
                                     f"{self.round}")
        if self.site not in roster.mask_keys:
            raise ExcludedError(f"this site is not in round {self.round}'s roster (its shares arrived after "
                                     "the roster was frozen)")
        if roster.mask_keys[self.site] != self.mask_key:
            raise ExcludedError("the roster holds another mask key for this site than this round's: its update "
                                     "could not be unmasked (a restart since its shares were sent makes it a dropout)")
        if roster.num_samples.get(self.site) != self.num_samples or set(roster.num_samples) != set(roster.mask_keys):
            raise SecAggRefusedError(f"the roster weighs this site by {roster.num_samples.get(self.site)} records; its "
                                     f"shares said {self.num_samples}")
        strangers = sorted(set(roster.mask_keys) - set(self._share_keys))
        if strangers:
            raise SecAggRefusedError(f"the roster names sites that were not participants: {strangers}")
        if roster.threshold != self.threshold or len(roster.mask_keys) < self.threshold:
            raise SecAggRefusedError(f"the roster has {len(roster.mask_keys)} sites and threshold "
                                     f"{roster.threshold}; the job's threshold is {self.threshold}")

    def mask(self, values: np.ndarray, roster: MaskRoster) -> np.ndarray:
        """`values` (int64 in [0, 2^32)) masked with the self seed and a pairwise seed with every other roster
        site (X25519 agreement of the mask keys, bound to job and round)."""
        self.check_roster(roster)
        purpose = mask_purpose(self.job_id, self.round)
        pair_seeds = {peer: keys.agree(self._mask_private, unb64(pub), purpose)
                      for peer, pub in roster.mask_keys.items() if peer != self.site}
        return masking.mask(values, self._seed, pair_seeds, self.site)

    def reveal(self, work: UnmaskWork, request: UnmaskRequest, roster: MaskRoster,
               previous: tuple[list[str], list[str]] | None) -> RevealOutcome:
        return reveal(self.site, self._share_private, self._share_keys, work, request, roster, previous)


def reveal(site: str, share_private: bytes, share_keys: Mapping[str, str], work: UnmaskWork, request: UnmaskRequest,
           roster: MaskRoster, previous: tuple[list[str], list[str]] | None) -> RevealOutcome:
    """The site's answer to a verified unmask request: self-mask shares of the survivors, mask-key shares of the
    dropped sites, opened from its inbox. Needs only the share key and the inbox, so it works after a restart.

    Raises `SecAggRefusedError` when the request could expose an individual update: this site not a survivor,
    fewer survivors than the threshold, sites outside the roster, or a split of survivors and dropped sites other
    than the one `previous` (this round's earlier reveal, from the agent state) named. A share that fails to open
    (replayed from another round, presented as from another sender, corrupted) is left out and reported."""
    if (request.job_id, request.round) != (roster.job_id, roster.round):
        raise SecAggRefusedError(f"an unmask request for {request.job_id} round {request.round} with the roster of "
                                 f"{roster.job_id} round {roster.round}")
    survivors, dropped = set(request.survivors), set(request.dropped)
    if site not in survivors:
        raise SecAggRefusedError("the unmask request does not list this site as a survivor")
    outside = sorted((survivors | dropped) - set(roster.mask_keys))
    if outside:
        raise SecAggRefusedError(f"the unmask request names sites outside the round's roster: {outside}")
    if len(survivors) < roster.threshold:
        raise SecAggRefusedError(f"{len(survivors)} survivors, below the threshold {roster.threshold}: revealing "
                                 "would unmask a sum of too few sites")
    if previous is not None and (set(previous[0]), set(previous[1])) != (survivors, dropped):
        raise SecAggRefusedError(
            f"this site already revealed for round {request.round} with survivors {sorted(previous[0])} and dropped "
            f"{sorted(previous[1])}; a different split (survivors {sorted(survivors)}, dropped {sorted(dropped)}) "
            "could give the aggregator both kinds of share of one site")
    self_mask: dict[str, str] = {}
    mask_key: dict[str, str] = {}
    unopened: dict[str, str] = {}
    for sender, sealed in sorted(work.inbox.items()):
        if sender not in survivors and sender not in dropped:
            continue
        try:
            if sender not in share_keys:
                raise SecAggError("the sender is not a participant of the task")
            box = keys.agree(share_private, unb64(share_keys[sender]), share_purpose(request.job_id))
            plain = keys.open_sealed(box, unb64(sealed), keys.share_ad(request.job_id, request.round, sender, site))
            if not plain or len(plain) % 2:
                raise SecAggError(f"a share plaintext of {len(plain)} bytes")
        except (SecAggError, ValueError) as exc:
            unopened[sender] = str(exc) or type(exc).__name__
            continue
        half = len(plain) // 2
        if sender in survivors:
            self_mask[sender] = b64(plain[half:])
        else:
            mask_key[sender] = b64(plain[:half])
    out = Reveal(job_id=request.job_id, round=request.round, site=site, self_mask_shares=self_mask,
                 mask_key_shares=mask_key)
    return RevealOutcome(out, unopened)
