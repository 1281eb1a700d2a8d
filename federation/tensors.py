"""Canonical tensor bytes on the wire: safetensors (no pickle, no code), identified by sha256."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from safetensors.numpy import load, save

from federation.models import Weights


class PayloadError(ValueError):
    """Bytes that do not decode to a well-formed set of finite float32 tensors."""


class HeaderTooLarge(PayloadError):
    """A safetensors header far longer than the expected layout's (metadata, or tensors that should not be there)."""


class SizeMismatch(PayloadError):
    """Tensor data of another size than the expected layout's."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(weights: Weights) -> bytes:
    # safetensors sorts tensors by name, so equal weights always give equal bytes and equal hashes.
    return save({k: np.ascontiguousarray(v) for k, v in weights.items()})


METADATA_SLACK = 1024  # bytes a sender's header may add to ours: `__metadata__`, alignment padding


def header_size(template: Weights) -> int:
    """The length of the safetensors header of `template`'s tensors, as `encode` writes it."""
    offsets, entries = 0, {}
    for name in sorted(template):
        v = template[name]
        entries[name] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offsets, offsets + v.nbytes]}
        offsets += v.nbytes
    return len(json.dumps(entries, separators=(",", ":")))


def frame_limit(template: Weights) -> int:
    """The most bytes an encoding of `template`'s layout can take (what `check_frame` lets through): a body
    announced longer is refused before it is read."""
    return 8 + header_size(template) + METADATA_SLACK + sum(v.nbytes for v in template.values())


def check_frame(data: bytes, template: Weights) -> None:
    """Refuse, before anything is parsed, bytes that cannot be `template`'s tensors: the safetensors header (its
    length is the first 8 bytes) may be at most `METADATA_SLACK` longer than the header of `template` itself, and
    the data after it exactly `template`'s size. A header of a million empty tensors, or megabytes of metadata
    beside valid tensors, then costs a length comparison, not a parse."""
    if len(data) < 8:
        raise PayloadError(f"{len(data)} bytes: too short for a safetensors payload")
    expected_header = header_size(template)
    header = int.from_bytes(data[:8], "little")
    if header > len(data) - 8:
        raise PayloadError(f"not a safetensors payload: a header of {header} bytes in {len(data)} bytes")
    if header > expected_header + METADATA_SLACK:
        raise HeaderTooLarge(f"safetensors header of {header} bytes; this job's layout needs about {expected_header}")
    body = sum(v.nbytes for v in template.values())
    if len(data) != 8 + header + body:
        raise SizeMismatch(f"{len(data) - 8 - header} bytes of tensor data; this job's layout has {body}")


def decode(data: bytes) -> Weights:
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for every malformed header
        raise PayloadError(f"not a safetensors payload: {exc}") from exc
    return dict(tensors)


def l2_norm(weights: Weights) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in weights.values())))


def all_finite(weights: Weights) -> bool:
    return all(bool(np.isfinite(v).all()) for v in weights.values())
