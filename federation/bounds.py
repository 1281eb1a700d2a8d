"""The ranges every number a site sends must lie in: checked on the wire (`federation.messages`) and again on every
row read back from the aggregator's store (`aggregator.store.checks`), so nothing a participant sends can be too
large to store, sum or serve, and a row that somehow is cannot stop the aggregator.

Each bound is far beyond what a real site sends and far inside what the stores hold: PostgreSQL's BIGINT for sample
counts (a round sums at most 1,000 sites × `MAX_SAMPLES`), IEEE doubles for the rest.
"""

from __future__ import annotations

import math

MAX_SAMPLES = 1_000_000_000  # records behind one update or one evaluation
MAX_LOSS = 1e12  # a per-record loss: a sane model's is a few units, a diverging one may be millions
MAX_EPSILON = 1e6  # ε a site reports; far past any budget a policy would allow
MAX_ROUND = 1_000_000  # far beyond any job (JobSpec.rounds ≤ 10,000)
MAX_REASONS = 50  # reasons in one answer, each at most MAX_TEXT characters
MAX_TEXT = 1000
MAX_AUDIT_SEQ = 10**15  # entries in a site's audit log: far beyond any, far inside BIGINT


def finite_in(value: float | None, low: float, high: float) -> bool:
    """True for a float in [low, high]; NaN and ±Infinity never are."""
    return value is not None and isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
