"""Aggregation strategies. Each folds validated updates into O(model) state and produces the next model.

The round engine knows nothing about how updates are combined; robustness belongs here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from federation.models import Weights


class Strategy(ABC):
    @abstractmethod
    def reset(self, template: Weights) -> None:
        """Start a new round for a model with `template`'s layout."""

    @abstractmethod
    def add(self, update: Weights, num_samples: int) -> None: ...

    @abstractmethod
    def apply(self, global_weights: Weights) -> Weights:
        """The next global model from the current one and the updates added this round."""

    @property
    @abstractmethod
    def count(self) -> int: ...


class FedAvg(Strategy):
    """Sample-weighted mean of the deltas, kept as a running sum (memory independent of the site count)."""

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        self._lr = server_learning_rate
        self._sum: dict[str, np.ndarray] = {}
        self._weight = 0
        self._count = 0

    def reset(self, template: Weights) -> None:
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
        self._weight = 0
        self._count = 0

    def add(self, update: Weights, num_samples: int) -> None:
        for k, v in update.items():
            self._sum[k] += num_samples * v.astype(np.float64)
        self._weight += num_samples
        self._count += 1

    def apply(self, global_weights: Weights) -> Weights:
        if self._weight == 0:
            raise ValueError("no update to aggregate")
        return {
            k: (global_weights[k].astype(np.float64) + self._lr * self._sum[k] / self._weight).astype(np.float32)
            for k in global_weights
        }

    @property
    def count(self) -> int:
        return self._count


def make_strategy(name: str, server_learning_rate: float) -> Strategy:
    if name == "fedavg":
        return FedAvg(server_learning_rate)
    raise ValueError(f"unknown aggregation strategy {name!r}")
