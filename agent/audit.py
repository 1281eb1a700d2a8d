"""The append-only, hash-chained audit log: every decision the agent takes about a job, and every refusal
of its egress gate. Each entry carries the hash of the previous one, so an edited, reordered or deleted
entry breaks the chain (`fedsilo audit verify`); the count and head hash also live in the agent's state
database, which catches a truncated tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._head = 0, GENESIS
        if path.exists():
            for entry in _entries(path):
                self._seq, self._head = entry["seq"], entry["hash"]

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._head

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"seq": self._seq + 1, "at": time.time(), "event": event, **fields,
                                 "prev": self._head}
        entry["hash"] = _digest(entry)
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._seq, self._head = entry["seq"], entry["hash"]
        return entry


def _entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    problems: list[str]


def verify(path: Path, expected_head: tuple[int, str] | None = None) -> Verification:
    """Check the chain; with `expected_head` (from the state database) also catch a cut-off tail."""
    problems: list[str] = []
    prev, seq = GENESIS, 0
    try:
        entries = _entries(path)
    except (OSError, ValueError) as exc:
        return Verification(False, 0, [f"cannot read {path}: {exc}"])
    for i, e in enumerate(entries, 1):
        if e.get("seq") != seq + 1:
            problems.append(f"line {i}: sequence {e.get('seq')} follows {seq} (an entry is missing or moved)")
        if e.get("prev") != prev:
            problems.append(f"line {i} (seq {e.get('seq')}): does not chain to the entry before it")
        if e.get("hash") != _digest(e):
            problems.append(f"line {i} (seq {e.get('seq')}): content does not match its hash (edited)")
        prev, seq = e.get("hash", ""), int(e.get("seq", seq + 1))
    if expected_head is not None and (seq, prev) != expected_head:
        problems.append(f"the log ends at entry {seq}, but the agent recorded {expected_head[0]} entries "
                        "(entries were removed from the end)")
    return Verification(not problems, len(entries), problems)
