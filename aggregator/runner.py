"""One active job's in-memory state, and the small pure functions the round engine applies to it.

The engine is its job's only writer, so this state is authoritative while the job runs, and everything in it can be
rebuilt from the store (`RoundEngine.recover`). Keeping the current round, the sites that reported in it and each
site's decision here is what makes an upload cost the same whatever the number of sites: no per-upload query
returns one row per site.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
from dataclasses import dataclass, field

import numpy as np

from aggregator.secagg import SecureRound
from aggregator.store import RoundRow
from aggregator.store.leases import Fence
from aggregator.strategies import Strategy
from federation.jobs import JobSpec
from federation.messages import EvalMetrics
from federation.models import Weights, build_model, get_weights

ACTIVE = ("offered", "running")


@dataclass
class JobRunner:
    job_id: str
    spec: JobSpec
    global_weights: Weights
    model_sha: str  # the global model's blob, as in the store's job row
    strategy: Strategy
    state: str = "offered"  # offered | running, as in the store; ended (or "lost" with the lease) when dropped
    paused: bool = False
    decisions: dict[str, str] = field(default_factory=dict)  # site -> offered | accepted | refused | stopped
    active_sites: set[str] = field(default_factory=set)  # the sites whose decision is "accepted"
    round: RoundRow | None = None  # the current round as last written
    reported: set[str] = field(default_factory=set)  # sites whose update (or evaluation) of `round` is stored
    fence: Fence | None = None  # this replica's hold on the job's lease, checked by every write
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.Task[None] | None = None
    # Secure aggregation: each accepting site's per-job share key, the open round's protocol state, its share window
    share_keys: dict[str, str] = field(default_factory=dict)
    secure: SecureRound | None = None
    secure_timer: asyncio.Task[None] | None = None

    @property
    def ended(self) -> bool:
        """True once `RoundEngine._end` ran: a call that waited for the lock must then do nothing."""
        return self.state not in ACTIVE

    def decide(self, site: str, decision: str) -> None:
        self.decisions[site] = decision
        if decision == "accepted":
            self.active_sites.add(site)
        else:
            self.active_sites.discard(site)


def new_job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"{slug}-{secrets.token_hex(4)}"


def initial_weights(spec: JobSpec) -> Weights:
    model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden, seed=spec.seed)
    weights = get_weights(model)
    if spec.model.init == "seeded":
        return weights
    zeros = {k: np.zeros_like(v) for k, v in weights.items()}
    if spec.model.prior:
        # A model without hidden layers has one (1, inputs) weight matrix, its columns in encoded-input order.
        (name,) = [k for k, v in zeros.items() if v.ndim == 2]
        index = {n: i for i, n in enumerate(spec.features.encoded_names())}
        for feature, w in spec.model.prior.items():
            zeros[name][0, index[feature]] = w
    return zeros


def quorum_size(runner: JobRunner) -> int:
    """How many participating sites must report before a round closes early (ceil of the job's fraction)."""
    spec = runner.spec
    return min(len(runner.active_sites), max(spec.min_sites, math.ceil(spec.quorum * len(runner.active_sites))))


def weighted(per_site: dict[str, EvalMetrics]) -> EvalMetrics:
    """Sample-weighted mean of per-site validation metrics; a site without a metric is left out of its mean."""

    def mean(values: list[tuple[float | None, int]]) -> float | None:
        pairs = [(v, n) for v, n in values if v is not None]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    ms = list(per_site.values())
    return EvalMetrics(
        n=sum(m.n for m in ms), loss=mean([(m.loss, m.n) for m in ms]), auc=mean([(m.auc, m.n) for m in ms])
    )
