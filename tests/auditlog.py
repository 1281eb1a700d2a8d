"""What a local administrator can do to a site's audit log (`agent.audit`): edit an entry, then recompute every hash
after it, so that the chain verifies again on its own."""

from __future__ import annotations

import hashlib
import json

from agent.audit import GENESIS


def rechain(lines: list[str], edit_seq: int, decision: str) -> str:
    """The log's `lines` with entry `edit_seq`'s decision set to `decision` and the chain recomputed."""
    prev, out = GENESIS, []
    for line in lines:
        entry = json.loads(line)
        if entry["seq"] == edit_seq:
            entry["decision"] = decision
        entry["prev"] = prev
        body = {k: v for k, v in entry.items() if k != "hash"}
        entry["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        prev = entry["hash"]
        out.append(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    return "\n".join(out) + "\n"
