"""Aggregation strategies. Each combines one round's validated updates (deltas) into the next global model.

The round engine knows nothing about how updates are combined; robustness belongs here. FedAvg keeps a running
sum, so its memory is O(model) whatever the number of sites. The robust strategies (median, trimmed mean,
norm-bounded FedAvg) need every update of the round at once, so they hold O(model × sites): they are meant for
cross-silo federations of tens of hospitals, not thousands of devices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from federation.jobs import JobSpec
from federation.models import Weights
from federation.privacy import clip


class Strategy(ABC):
    def __init__(self, server_learning_rate: float = 1.0) -> None:
        self._lr = server_learning_rate

    @abstractmethod
    def reset(self, template: Weights) -> None:
        """Start a new round for a model with `template`'s layout."""

    @abstractmethod
    def add(self, update: Weights, num_samples: int) -> None: ...

    @abstractmethod
    def combine(self) -> Weights:
        """The round's aggregate delta (float64); raises ValueError when nothing was added."""

    @property
    @abstractmethod
    def count(self) -> int: ...

    def apply(self, global_weights: Weights) -> Weights:
        """The next global model: the current one moved by the server learning rate times the aggregate delta."""
        delta = self.combine()
        return {
            k: (global_weights[k].astype(np.float64) + self._lr * delta[k]).astype(np.float32)
            for k in global_weights
        }


class FedAvg(Strategy):
    """Sample-weighted mean of the deltas (McMahan et al., 2017), kept as a running sum.

    Also the server side of FedProx: the proximal term lives in each site's local loss."""

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate)
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

    def combine(self) -> Weights:
        if self._weight == 0:
            raise ValueError("no update to aggregate")
        return {k: v / self._weight for k, v in self._sum.items()}

    @property
    def count(self) -> int:
        return self._count


class _Buffered(Strategy):
    """Keeps the round's updates (as float32) and their claimed sample counts until `combine`."""

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate)
        self._updates: list[Weights] = []
        self._samples: list[int] = []

    def reset(self, template: Weights) -> None:
        self._updates, self._samples = [], []

    def add(self, update: Weights, num_samples: int) -> None:
        self._updates.append({k: np.asarray(v, dtype=np.float32) for k, v in update.items()})
        self._samples.append(num_samples)

    @property
    def count(self) -> int:
        return len(self._updates)

    def _stacked(self, key: str) -> np.ndarray:
        return np.stack([u[key] for u in self._updates]).astype(np.float64)

    def _keys(self) -> list[str]:
        """The tensor names of this round's updates; raises ValueError when nothing was added."""
        if not self._updates:
            raise ValueError("no update to aggregate")
        return list(self._updates[0])


class CoordinateMedian(_Buffered):
    """Coordinate-wise median (Yin et al., 2018): unweighted, so an inflated sample count buys nothing, and one
    site's values, however large, can move a coordinate no further than the honest sites' range."""

    def combine(self) -> Weights:
        return {k: np.median(self._stacked(k), axis=0) for k in self._keys()}


class TrimmedMean(_Buffered):
    """Coordinate-wise β-trimmed mean: drop the ⌊β·n⌋ largest and smallest values of each coordinate, average the
    rest (unweighted). With n sites it tolerates up to ⌊β·n⌋ poisoned ones."""

    def __init__(self, trim_fraction: float, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate)
        self._beta = trim_fraction

    def combine(self) -> Weights:
        keys, n = self._keys(), len(self._updates)
        cut = min(int(self._beta * n), (n - 1) // 2)
        return {k: np.sort(self._stacked(k), axis=0)[cut : n - cut].mean(axis=0) for k in keys}


class NormBoundedFedAvg(_Buffered):
    """FedAvg with each update clipped to `bound` on the server and each site's weight capped at the round's
    median claimed sample count, so that neither a scaled update nor an inflated count lets one site dominate."""

    def __init__(self, bound: float, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate)
        self._bound = bound

    def combine(self) -> Weights:
        keys = self._keys()
        weights = np.minimum(np.asarray(self._samples, dtype=np.float64), float(np.median(self._samples)))
        out = {k: np.zeros(self._updates[0][k].shape, dtype=np.float64) for k in keys}
        for update, w in zip(self._updates, weights / weights.sum(), strict=True):
            bounded, _ = clip(update, self._bound)  # the agents' own clipping, applied again on the server
            for k in keys:
                out[k] += w * bounded[k].astype(np.float64)
        return out


def make_strategy(spec: JobSpec) -> Strategy:
    """The strategy a job asks for, with its parameters."""
    lr, params = spec.server_learning_rate, spec.aggregation_params
    match spec.aggregation:
        case "fedavg" | "fedprox":
            return FedAvg(lr)
        case "median":
            return CoordinateMedian(lr)
        case "trimmed_mean":
            return TrimmedMean(params.trim_fraction, lr)
        case "fedavg_normbound":
            return NormBoundedFedAvg(params.norm_bound or spec.privacy.clip_norm, lr)
    raise ValueError(f"unknown aggregation strategy {spec.aggregation!r}")
