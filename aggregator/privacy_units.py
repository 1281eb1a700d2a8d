"""Which unit each ε is in, on the aggregator's side: what a site reported with its update, per unit.

A record-level job's ε is per patient record (DP-SGD); a site-level job's is per hospital dataset (update-level
noise); a site whose policy adds the site unit to a record-level job reports both. Updates from agents that predate
per-unit reporting carry one ε, in the job's unit.
"""

from __future__ import annotations

from federation.jobs import UNIT_WORDS, JobSpec
from federation.messages import UpdateEnvelope

__all__ = ["UNIT_WORDS", "spend_by_unit", "unit_label"]


def spend_by_unit(spec: JobSpec, env: UpdateEnvelope) -> dict[str, float | None]:
    """The ε an update's envelope reports, per unit (the job's unit first)."""
    reported = {s.unit: s.epsilon for s in env.privacy}
    return {spec.privacy.unit: reported.get(spec.privacy.unit, env.epsilon),
            **{u: e for u, e in reported.items() if u != spec.privacy.unit}}


def unit_label(unit: str) -> str:
    """`ε per patient record`, `ε per site`: how every table and chart names an ε."""
    return f"ε {UNIT_WORDS.get(unit, unit)}"
