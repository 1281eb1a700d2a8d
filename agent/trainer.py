"""Local training and evaluation of a registered model on this site's encoded data (PyTorch, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from federation.jobs import Hyperparameters
from federation.messages import EvalMetrics


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
    model: nn.Module, x: np.ndarray, y: np.ndarray, hp: Hyperparameters, seed: int, proximal_mu: float = 0.0
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
