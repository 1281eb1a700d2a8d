"""Which unit each ε is in, on the aggregator's side: what a site reported with its update, per unit.

A record-level job's ε is per patient record (DP-SGD); a site-level job's is per hospital dataset (update-level
noise); a site whose policy adds the site unit to a record-level job reports both. Updates from agents that predate
per-unit reporting carry one ε, in the job's unit. With secure aggregation a site-unit ε holds for the sum of the
job's threshold of sites' noise; beside it, under `site_alone`, is what the site's own noise guarantees should every
other site collude with the aggregator; `record_alone` the same for per-patient noise added in the secure sum
(`privacy.record_noise: distributed`).
"""

from __future__ import annotations

from federation.jobs import UNIT_WORDS, JobSpec
from federation.messages import UpdateEnvelope

__all__ = ["ALONE", "UNIT_WORDS", "alone", "spend_by_unit", "unit_label"]
ALONE = "site_alone"  # not a unit a job asks for: the secure-aggregation site unit's worst case, reported beside it
_WORDS = {**UNIT_WORDS, ALONE: "per site, own noise alone", "record_alone": "per patient record, own noise alone"}


def alone(unit: str) -> str:
    """The key under which a unit's own-share-alone ε is reported beside it (secure aggregation)."""
    return f"{unit}_alone"


def spend_by_unit(spec: JobSpec, env: UpdateEnvelope) -> dict[str, float | None]:
    """The ε an update's envelope reports, per unit (the job's unit first)."""
    reported = {s.unit: s.epsilon for s in env.privacy}
    own = {alone(s.unit): s.epsilon_alone for s in env.privacy if s.epsilon_alone is not None}
    return {spec.privacy.unit: reported.get(spec.privacy.unit, env.epsilon),
            **{u: e for u, e in reported.items() if u != spec.privacy.unit}, **own}


def unit_label(unit: str) -> str:
    """`ε per patient record`, `ε per site`: how every table and chart names an ε."""
    return f"ε {_WORDS.get(unit, unit)}"
