"""The one error the secure-aggregation math raises, so the protocol can tell a refused input (a forged key, a
tampered share, too few shares) from a bug."""

from __future__ import annotations


class SecAggError(ValueError):
    """An input the secure-aggregation math refuses: the message says which and why."""
