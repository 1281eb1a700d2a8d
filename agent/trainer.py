"""Local training and evaluation of a registered model on this site's encoded data (PyTorch, CPU)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from federation.jobs import Hyperparameters, JobSpec
from federation.messages import EvalMetrics

if TYPE_CHECKING:
    from agent.data import SiteData
    from agent.fedml_adapter import TrainerRegistration
    from agent.privacy_policy import SitePrivacy


class TrainingStoppedError(Exception):
    """Local training was stopped before it finished (the round's deadline or the site's time limit came first):
    its result is never released, so nothing is charged for it."""


def round_seed(spec: JobSpec, site: str, rnd: int) -> int:
    """A reproducible seed for randomness no DP guarantee rests on (the shuffling of non-private training). The
    aggregator can compute it: DP-SGD's sampling and noise never use it (`federation.noise`)."""
    digest = hashlib.sha256(f"{spec.seed}/{site}/{rnd}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def train_round(
    model: nn.Module, spec: JobSpec, data: SiteData, plan: SitePrivacy, trainers: dict[str, TrainerRegistration],
    site: str, rnd: int, stop_at: float | None = None,
) -> float:
    """One round of local training as the job and the site's plan say: the site's registered trainer, DP-SGD for
    the record unit, or plain minibatch SGD (shuffled reproducibly) for the site unit. Returns the mean loss.

    With `stop_at` (a `time.time()`), the built-in trainers raise `TrainingStoppedError` at their first step past
    it; a registered trainer runs to its end, and its late result is refused by the privacy engine instead."""
    def should_stop() -> bool:
        return stop_at is not None and time.time() > stop_at

    if spec.trainer is not None:  # the site's registered trainer; its output is privatized like any other
        from agent.fedml_adapter import train_registered

        return train_registered(model, trainers, spec, data.x_train, data.y_train, round_seed(spec, site, rnd), rnd)
    if plan.distributed:  # one step on the clipped gradient sum; its noise is added under the mask
        from agent.dpsgd import clipped_gradient_step

        return clipped_gradient_step(model, data.x_train, data.y_train, spec, should_stop)
    if plan.record is not None:
        from agent.dpsgd import train_dpsgd

        return train_dpsgd(model, data.x_train, data.y_train, spec, plan.record, should_stop)
    return train_local(model, data.x_train, data.y_train, spec.hyperparameters, round_seed(spec, site, rnd),
                       spec.aggregation_params.proximal_mu if spec.aggregation == "fedprox" else 0.0, should_stop)


def _optimizer(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay, momentum=hp.momentum
    )


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's μ/2·‖w − w_global‖²: keeps a site's local model near the global one when sites' data differ."""
    return 0.5 * mu * sum((torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor, strict=True)),
                          torch.zeros(()))


def train_local(
    model: nn.Module, x: np.ndarray, y: np.ndarray, hp: Hyperparameters, seed: int, proximal_mu: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """Minibatch training for `hp.epochs` passes (or `hp.max_steps` steps); returns the mean batch loss (without
    the proximal term, so that losses compare across strategies)."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, hp)
    loss_fn = nn.BCEWithLogitsLoss()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    model.train()
    losses: list[float] = []
    steps = 0
    for _ in range(hp.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), hp.batch_size):
            if should_stop is not None and should_stop():
                raise TrainingStoppedError(f"stopped after {steps} optimizer steps")
            idx = order[start : start + hp.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]).squeeze(-1), yt[idx])
            objective = loss + proximal_term(model, anchor, proximal_mu) if anchor else loss
            objective.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
            if hp.max_steps is not None and steps >= hp.max_steps:
                return float(np.mean(losses))
    return float(np.mean(losses)) if losses else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> EvalMetrics:
    """Validation loss and AUC; AUC is None when the split holds a single class."""
    model.eval()
    logits = model(torch.from_numpy(x)).squeeze(-1)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).float()))
    auc = float(roc_auc_score(y, logits.numpy())) if len(np.unique(y)) == 2 else None
    return EvalMetrics(n=len(y), loss=loss, auc=auc)
