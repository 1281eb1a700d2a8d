"""Re-read a file only when it changes: the CRL and the operators file are consulted on every request, so each
request costs one stat(), and the file is parsed again only when its modification time, size or inode differ from
the last look (an atomic replace, as `fedsilo` and the kubelet write these files, changes the inode)."""

from __future__ import annotations

import os
from pathlib import Path


class FileWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def mark(self) -> None:
        """Take the file as read as it is now; OSError if it cannot be looked at."""
        self._seen = self._signature()

    def changed(self) -> bool:
        """Whether the file changed since the last look (a missing file is a state of its own); the look is taken
        before the caller reads the file, so a change made while it reads is seen next time."""
        try:
            seen: tuple[int, int, int] | None = self._signature()
        except OSError:
            seen = None
        if seen == self._seen:
            return False
        self._seen = seen
        return True

    def _signature(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino
