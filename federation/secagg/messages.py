"""The wire messages of a secure-aggregation round, and the paths they travel.

One round, after the signed `RoundTask` (which lists every participant's per-job share key, `RoundTask.secagg`):

1. share: each site posts a `ShareBundle`: a fresh per-round mask key and, for every participant (itself
   included), Shamir shares of its mask private key and of its self-mask seed, sealed (AEAD) to the recipient's
   share key. The aggregator relays them and can open none.
2. roster: the aggregator freezes the sites whose bundle arrived and serves a signed `MaskRoster` (their mask keys);
   each site masks its quantized, noised update against exactly those sites and uploads it as usual.
3. unmask: once the round's uploads are in, the aggregator serves a signed `UnmaskRequest` (who uploaded, who
   dropped) with each site's sealed inbox; each survivor answers with a `Reveal`: self-mask shares of survivors,
   mask-key shares of dropped sites, never both for one site.

Every field is bounded as for any other site message; nothing here is pickled.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import Field, model_validator

from federation.bounds import MAX_ROUND, MAX_SAMPLES
from federation.jobs import SiteName
from federation.messages import JobId, Nonce, PublicKey, SiteMessage
from federation.schema import Frozen

MAX_SITES = 1000  # JobSpec.sites' bound
# urlsafe base64 of a sealed share (nonce, two Shamir shares, tag: about 100 bytes) or of one Shamir share
Sealed = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{16,340}={0,2}$")]
ShareText = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{16,120}={0,2}$")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode())


class ShareBundle(SiteMessage):
    """Site → aggregator: this round's mask public key and its sealed shares, one per participant."""

    job_id: JobId
    round: int = Field(ge=1, le=MAX_ROUND)
    site: SiteName
    mask_key: PublicKey
    # The records behind this site's update (as its envelope will say): the weight of its update in the sum
    num_samples: int = Field(ge=1, le=MAX_SAMPLES)
    # sha256 of the self-mask seed: lets the aggregator check the seed it reconstructs before using it
    seed_commitment: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    shares: dict[SiteName, Sealed] = Field(max_length=MAX_SITES)


class MaskRoster(Frozen):
    """Aggregator → sites, signed: the sites whose shares arrived, with their mask keys. A site masks against exactly
    these, and uploads only if it is one of them."""

    kind: Literal["secagg_roster"] = "secagg_roster"
    job_id: JobId
    round: int = Field(ge=1, le=MAX_ROUND)
    threshold: int = Field(ge=2, le=MAX_SITES)
    mask_keys: dict[SiteName, PublicKey] = Field(max_length=MAX_SITES)
    # each roster site's record count: the weights of a sample-weighted job (`federation.secagg.job.weights`)
    num_samples: dict[SiteName, Annotated[int, Field(ge=1, le=MAX_SAMPLES)]] = Field(max_length=MAX_SITES)
    issued_at: float
    nonce: Nonce


class UnmaskRequest(Frozen):
    """Aggregator → sites, signed: whose masked update is in the sum (`survivors`) and whose is not (`dropped`)."""

    kind: Literal["secagg_unmask"] = "secagg_unmask"
    job_id: JobId
    round: int = Field(ge=1, le=MAX_ROUND)
    survivors: list[SiteName] = Field(max_length=MAX_SITES)
    dropped: list[SiteName] = Field(max_length=MAX_SITES)
    deadline: float
    issued_at: float
    nonce: Nonce

    @model_validator(mode="after")
    def _disjoint(self) -> UnmaskRequest:
        if set(self.survivors) & set(self.dropped):
            raise ValueError("a site is listed as both a survivor and dropped")
        return self


class UnmaskWork(Frozen):
    """What `GET …/secagg/unmask` returns to one site: the signed request and the sealed shares addressed to it."""

    request: str  # the signed UnmaskRequest (federation.signing), as text
    inbox: dict[SiteName, Sealed] = Field(max_length=MAX_SITES)  # sender → sealed share for this site


class Reveal(SiteMessage):
    """Site → aggregator: the shares the unmask request needs from this site, opened."""

    job_id: JobId
    round: int = Field(ge=1, le=MAX_ROUND)
    site: SiteName
    self_mask_shares: dict[SiteName, ShareText] = Field(max_length=MAX_SITES)  # of survivors' self-mask seeds
    mask_key_shares: dict[SiteName, ShareText] = Field(max_length=MAX_SITES)  # of dropped sites' mask keys

    @model_validator(mode="after")
    def _never_both(self) -> Reveal:
        both = set(self.self_mask_shares) & set(self.mask_key_shares)
        if both:
            raise ValueError(f"both kinds of share for {sorted(both)}: that would unmask an individual update")
        return self


def shares_path(job_id: str, rnd: int) -> str:
    return f"/api/v1/jobs/{job_id}/rounds/{rnd}/secagg/shares"


def roster_path(job_id: str, rnd: int) -> str:
    return f"/api/v1/jobs/{job_id}/rounds/{rnd}/secagg/roster"


def unmask_path(job_id: str, rnd: int) -> str:
    return f"/api/v1/jobs/{job_id}/rounds/{rnd}/secagg/unmask"


def reveal_path(job_id: str, rnd: int) -> str:
    return f"/api/v1/jobs/{job_id}/rounds/{rnd}/secagg/reveal"


# A long poll (GET roster / unmask with ?wait=S) is held at most this long; the answer is 202 while not ready.
MAX_WAIT_S = 25.0
