"""Named crash points for fault tests. `FEDSILO_FAILPOINT=<name>` makes the process die (like SIGKILL: no
cleanup, no flush) when it reaches that point; `<name>:<n>` on its n-th arrival there; `<name>:<n>:stop` freezes it
there instead (SIGSTOP to itself, as a long GC pause or a stalled VM would) until the test sends SIGCONT. Unset, a
failpoint costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
from collections import Counter

EXIT_CODE = 86
_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("FEDSILO_FAILPOINT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, action = rest.partition(":")
    _hits[name] += 1
    if _hits[name] == int(nth or 1) and action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif _hits[name] >= int(nth or 1) and action != "stop":
        os._exit(EXIT_CODE)
