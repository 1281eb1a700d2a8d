"""Named crash points for fault tests. `FEDSILO_FAILPOINT=<name>` makes the process die (like SIGKILL: no
cleanup, no flush) when it reaches that point; `<name>:<n>` on its n-th arrival there. Unset, a failpoint
costs one dictionary lookup."""

from __future__ import annotations

import os
from collections import Counter

EXIT_CODE = 86
_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("FEDSILO_FAILPOINT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(nth or 1):
        os._exit(EXIT_CODE)
