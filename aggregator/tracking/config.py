"""Which experiment-tracking sinks are active, and their settings."""

from __future__ import annotations

from federation.schema import Frozen


class TrackingConfig(Frozen):
    """No sink is active unless configured; the job report on disk is always written."""
