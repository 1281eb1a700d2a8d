"""Content-addressed blob storage for global models and received updates.

A blob's name is the sha256 of its bytes, so a write is idempotent and a reader can verify what it got: every
implementation checks the hash on every read and raises `BlobCorrupted` rather than return other bytes.
`FileBlobStore` writes to a temporary file, fsyncs it, renames it into place and fsyncs the directory:
a crash leaves either no blob or the whole blob. `S3BlobStore` (`aggregator.blobs_s3`) keeps them in S3.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from federation.tensors import sha256_hex

if TYPE_CHECKING:
    from aggregator.blobs_s3 import S3BlobConfig

log = structlog.get_logger(__name__)

# What a blob is decides only how long a store with a retention policy keeps it (S3: a lifecycle rule expires
# round updates, never models). "model" is the safe default: a blob put without a kind is kept.
BlobKind = Literal["model", "update"]
HEX = frozenset("0123456789abcdef")


class BlobStoreError(RuntimeError):
    """The store could not be reached or refused the call (after its retries); nothing was stored or read."""


class BlobCorrupted(BlobStoreError):
    """The stored bytes do not hash to their name: never returned, the message names where they lie."""


def check_sha(sha: str) -> str:
    """A blob name is exactly 64 lower-case hex digits: anything else (a path, a key) names no blob."""
    if len(sha) != 64 or not HEX.issuperset(sha):
        raise KeyError(sha)
    return sha


def verified(data: bytes, sha: str, where: str) -> bytes:
    actual = sha256_hex(data)
    if actual != sha:
        log.error("blob_corrupted", where=where, expected=sha, actual=actual, size=len(data))
        raise BlobCorrupted(f"{where}: the stored bytes hash to {actual}, not to their name {sha}; "
                            f"the blob is corrupted and was not used")
    return data


class BlobStore(ABC):
    @abstractmethod
    def put(self, data: bytes, kind: BlobKind = "model") -> str:
        """Store `data` durably; return its sha256. Storing bytes that are already there is a no-op."""

    @abstractmethod
    def get(self, sha: str) -> bytes:
        """Return the blob, its hash checked; KeyError if absent, BlobCorrupted if its bytes do not match."""

    @abstractmethod
    def exists(self, sha: str) -> bool: ...


class FileBlobStore(BlobStore):
    """Blobs as files `<root>/<sha[:2]>/<sha>`. Kinds share the layout: nothing on local disk expires."""

    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha: str) -> Path:
        check_sha(sha)
        return self._root / sha[:2] / sha

    def put(self, data: bytes, kind: BlobKind = "model") -> str:
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
        path = self._path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(sha) from None
        return verified(data, sha, str(path))

    def exists(self, sha: str) -> bool:
        try:
            return self._path(sha).exists()
        except KeyError:
            return False


def open_blobs(url: str, s3: S3BlobConfig | None = None) -> BlobStore:
    """Pick an implementation from a URL: `file:///path/to/blobs` (the default) or `s3://bucket/prefix`
    (settings in `s3`: region, endpoint, KMS key, retries, timeouts)."""
    if url.startswith("file://"):
        return FileBlobStore(Path(url.removeprefix("file://")))
    if url.startswith("s3://"):
        from aggregator.blobs_s3 import S3BlobConfig, S3BlobStore

        return S3BlobStore(url, s3 or S3BlobConfig())
    raise ValueError(f"unsupported blob store URL {url!r}; expected file:///PATH or s3://BUCKET/PREFIX")
