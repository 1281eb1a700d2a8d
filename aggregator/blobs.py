"""Content-addressed blob storage for global models and received updates.

A blob's name is the sha256 of its bytes, so a write is idempotent and a reader can verify what it got.
`FileBlobStore` writes to a temporary file, fsyncs it, renames it into place and fsyncs the directory:
a crash leaves either no blob or the whole blob.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from federation.tensors import sha256_hex


class BlobStore(ABC):
    @abstractmethod
    def put(self, data: bytes) -> str:
        """Store `data` durably; return its sha256."""

    @abstractmethod
    def get(self, sha: str) -> bytes:
        """Return the blob; KeyError if absent."""

    @abstractmethod
    def exists(self, sha: str) -> bool: ...


class FileBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise KeyError(sha)
        return self._root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = sha256_hex(data)
        path = self._path(sha)
        if path.exists():
            return sha
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return self._path(sha).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha) from None

    def exists(self, sha: str) -> bool:
        try:
            return self._path(sha).exists()
        except KeyError:
            return False


def open_blobs(url: str) -> BlobStore:
    """Pick an implementation from a URL: `file:///path/to/blobs` (the default)."""
    if url.startswith("file://"):
        return FileBlobStore(Path(url.removeprefix("file://")))
    raise ValueError(f"unsupported blob store URL {url!r}; expected file:///PATH")
