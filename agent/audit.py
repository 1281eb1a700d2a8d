"""The append-only, hash-chained audit log: every decision the agent takes about a job, and every refusal
of its egress gate. Each entry carries the hash of the previous one, so an edited, reordered or deleted
entry breaks the chain (`fedsilo audit verify`); the count and head hash also live in the agent's state
database, which catches a truncated tail.

Both are on the hospital's own disks: an administrator who rewrites an entry, re-chains every entry after it and
updates the state database gets a log that verifies. So the agent also carries the head in every status and event it
sends; the aggregator keeps the latest (`GET /api/v1/sites/{site}/audit-head`), and a chain rewritten at or before
that entry no longer contains it (`fedsilo audit verify --aggregator-head`).
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


def verify(path: Path, expected_head: tuple[int, str] | None = None,
           recorded: tuple[int | None, str] | None = None) -> Verification:
    """Check the chain; with `expected_head` (from the state database) also catch a cut-off tail; with `recorded`
    (the head the aggregator keeps: entry count, when known, and hash) catch a chain rewritten and re-chained."""
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
    if recorded is not None:
        problems.extend(_against_recorded(entries, *recorded))
    return Verification(not problems, len(entries), problems)


def _against_recorded(entries: list[dict[str, Any]], seq: int | None, digest: str) -> list[str]:
    if digest == GENESIS and seq in (None, 0):
        return []
    hashes = {e.get("hash"): e.get("seq") for e in entries}
    if seq is None:
        return [] if digest in hashes else [
            f"no entry has the hash the aggregator recorded ({digest[:16]}…): the chain was rewritten"]
    at = next((e for e in entries if e.get("seq") == seq), None)
    if at is None:
        return [f"the aggregator recorded entry {seq} ({digest[:16]}…), but this log has no entry {seq} "
                "(entries were removed)"]
    if at.get("hash") != digest:
        return [f"entry {seq} has hash {str(at.get('hash'))[:16]}…, but the aggregator recorded {digest[:16]}… for it "
                "(the chain was rewritten and re-chained)"]
    return []
