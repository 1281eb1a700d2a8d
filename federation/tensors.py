"""Canonical tensor bytes on the wire: safetensors (no pickle, no code), identified by sha256."""

from __future__ import annotations

import hashlib

import numpy as np
from safetensors.numpy import load, save

from federation.models import Weights


class PayloadError(ValueError):
    """Bytes that do not decode to a well-formed set of finite float32 tensors."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(weights: Weights) -> bytes:
    # safetensors sorts tensors by name, so equal weights always give equal bytes and equal hashes.
    return save({k: np.ascontiguousarray(v) for k, v in weights.items()})


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
