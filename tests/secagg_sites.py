"""Secure-aggregation sites for agent tests, without an aggregator: four sites' share keys, the aggregator's side of
the messages (rosters, unmask requests, inboxes) made by the test and signed with a test key."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.egress import UploadRejectedError
from agent.privacy import PrivatizedUpdate
from agent.privacy_policy import SitePrivacy, secure_quantization
from agent.secagg import SecureRound, ShareKeys
from federation.jobs import JobSpec
from federation.messages import SiteEvent
from federation.secagg import keys
from federation.secagg.messages import MaskRoster, Reveal, ShareBundle, UnmaskRequest, UnmaskWork, b64
from federation.signing import sign

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease.yaml"
JOB = "job-secure"
# The four UCI centers; the job's threshold is 3 of 4.
SPEC = JobSpec.model_validate({**yaml.safe_load(EXAMPLE.read_text()),
                               "privacy": {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.8, "delta": 1e-5},
                               "secure_aggregation": {"threshold": 3}})
SITES = sorted(SPEC.sites)
THRESHOLD = SPEC.secagg_threshold
KEY = Ed25519PrivateKey.generate()  # the aggregator's signing key in these tests


def site_plan(spec: JobSpec = SPEC) -> SitePrivacy:
    p = spec.privacy
    return SitePrivacy(("site",), None, p.noise_multiplier, p.clip_norm, p.delta, secure_quantization(spec))


def share_keys(root: Path, sites: list[str] = SITES) -> dict[str, ShareKeys]:
    """Each site's share keys, from its own state directory."""
    return {s: ShareKeys(root / s / "secagg.key") for s in sites}


def task_keys(keys: dict[str, ShareKeys], job_id: str = JOB) -> dict[str, str]:
    """`RoundTask.share_keys`: every participant's public share key for the job."""
    return {s: k.public(job_id) for s, k in keys.items()}


def rounds(keys: dict[str, ShareKeys], rnd: int = 1, job_id: str = JOB) -> dict[str, SecureRound]:
    published = task_keys(keys, job_id)
    return {s: SecureRound(s, job_id, rnd, THRESHOLD, k.private(job_id), published, SITES) for s, k in keys.items()}


def roster(bundles: dict[str, ShareBundle], rnd: int = 1, job_id: str = JOB) -> MaskRoster:
    """The roster the aggregator would freeze from these bundles."""
    return roster_of({s: b.mask_key for s, b in bundles.items()}, rnd, job_id,
                     {s: b.num_samples for s, b in bundles.items()})


def roster_of(mask_keys: dict[str, str], rnd: int = 1, job_id: str = JOB,
              num_samples: dict[str, int] | None = None) -> MaskRoster:
    return MaskRoster(job_id=job_id, round=rnd, threshold=THRESHOLD, mask_keys=mask_keys,
                      num_samples=num_samples or dict.fromkeys(mask_keys, 1), issued_at=time.time(),
                      nonce=secrets.token_hex(16))


def any_mask_keys(sites: list[str] = SITES) -> dict[str, str]:
    """Mask keys for a roster whose keys the test does not use (revealing needs only who is in it)."""
    return {s: b64(keys.public_key(keys.new_private_key())) for s in sites}


def request(survivors: list[str], dropped: list[str], rnd: int = 1, job_id: str = JOB) -> UnmaskRequest:
    return UnmaskRequest(job_id=job_id, round=rnd, survivors=survivors, dropped=dropped, deadline=time.time() + 60,
                         issued_at=time.time(), nonce=secrets.token_hex(16))


def inbox(bundles: dict[str, ShareBundle], recipient: str) -> dict[str, str]:
    """What the aggregator relays to `recipient`: every sender's share sealed to it."""
    return {sender: b.shares[recipient] for sender, b in bundles.items()}


def work(req: UnmaskRequest, box: dict[str, str], key: Ed25519PrivateKey) -> UnmaskWork:
    return UnmaskWork(request=sign(req, key).decode(), inbox=box)


class ScriptedAggregator:
    """The egress gate's calls, answered from what the test put here; what the site sent is kept."""

    def __init__(self, model: bytes = b"") -> None:
        self.model = model
        self.shares: list[ShareBundle] = []
        self.reveals: list[Reveal] = []
        self.updates: list[PrivatizedUpdate] = []
        self.events: list[SiteEvent] = []
        self.roster: bytes | None = None
        self.work: UnmaskWork | None = None
        self.frozen_without_us = False
        self.answer_roster = False  # the shares' answer carries the roster (when the site waits for it)
        self.roster_fetches = 0

    async def fetch_model(self, sha: str) -> bytes:
        return self.model

    async def send_update(self, update: PrivatizedUpdate) -> bytes:
        self.updates.append(update)
        return b'{"status": "accepted"}'

    def publish_event(self, event: SiteEvent) -> None:
        self.events.append(event)

    async def send_shares(self, bundle: ShareBundle, wait: float = 0.0) -> bytes:
        if self.frozen_without_us:
            raise UploadRejectedError(409, "roster_frozen", "the roster was frozen without this site")
        self.shares.append(bundle)
        return self.shares_answer(wait)

    def shares_answer(self, wait: float) -> bytes:
        answer: dict[str, object] = {"status": "accepted"}
        if self.answer_roster and wait > 0 and self.roster is not None:
            answer["roster"] = self.roster.decode()
        return json.dumps(answer).encode()

    async def fetch_roster(self, job_id: str, rnd: int, wait: float) -> bytes | None:
        self.roster_fetches += 1
        return self.roster

    async def fetch_unmask(self, job_id: str, rnd: int, wait: float) -> UnmaskWork | None:
        return self.work

    async def send_reveal(self, reveal: Reveal) -> bytes:
        self.reveals.append(reveal)
        return b'{"status": "accepted"}'
