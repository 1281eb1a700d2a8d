"""The model zoo: architectures registered by name, built identically by the aggregator and every agent.

A job names a model and its shape parameters; no code ever travels with a job. Parameters travel as
name → float32 array, in the order of the module's state dict.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

Weights = dict[str, np.ndarray]
Builder = Callable[[int, Sequence[int]], nn.Module]


def _logreg(input_dim: int, hidden: Sequence[int]) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, 1))


def _mlp(input_dim: int, hidden: Sequence[int]) -> nn.Module:
    widths = [input_dim, *(hidden or [32])]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 1))
    return nn.Sequential(*layers)


_REGISTRY: dict[str, Builder] = {"logreg": _logreg, "mlp": _mlp}


def _dense_count(widths: Sequence[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(widths))


# Parameter counts by arithmetic, so that a job's size is checked before anything is built (a job asking for a
# 67M-parameter model must be refused without allocating it). Each registered model has one; a test holds them to
# the built models' counts.
_COUNTS: dict[str, Callable[[int, Sequence[int]], int]] = {
    "logreg": lambda d, _h: _dense_count([d, 1]),
    "mlp": lambda d, h: _dense_count([d, *(h or [32]), 1]),
}


def count_parameters(name: str, input_dim: int, hidden: Sequence[int] = ()) -> int:
    """How many parameters `build_model(name, input_dim, hidden)` would have, without building it."""
    if name not in _COUNTS:
        raise KeyError(f"model {name!r} is not registered; registered: {sorted(_REGISTRY)}")
    return _COUNTS[name](input_dim, hidden)


def registered_models() -> frozenset[str]:
    return frozenset(_REGISTRY)


def build_model(name: str, input_dim: int, hidden: Sequence[int] = (), seed: int = 0) -> nn.Module:
    """Build a registered binary classifier (one logit out) with a seeded initialization."""
    if name not in _REGISTRY:
        raise KeyError(f"model {name!r} is not registered; registered: {sorted(_REGISTRY)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _REGISTRY[name](input_dim, hidden)


def get_weights(model: nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    check_layout(weights, get_weights(model))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})


def layout(weights: Weights) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.items()}


def check_layout(got: Weights, expected: Weights) -> None:
    """Raise ValueError naming the first difference in tensor names, shapes or dtypes."""
    g, e = layout(got), layout(expected)
    if set(g) != set(e):
        missing, extra = sorted(set(e) - set(g)), sorted(set(g) - set(e))
        raise ValueError(f"tensor names differ: missing {missing}, unexpected {extra}")
    for name, (shape, dtype) in e.items():
        if g[name] != (shape, dtype):
            raise ValueError(f"tensor {name!r} is {g[name][1]}{list(g[name][0])}, expected {dtype}{list(shape)}")


def parameter_count(weights: Weights) -> int:
    return int(sum(v.size for v in weights.values()))
