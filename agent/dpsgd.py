"""Record-level DP: local training with DP-SGD (Opacus: Poisson-sampled batches, per-example clipping,
Gaussian noise), and its accounting with Opacus's RDP accountant.

Used when a job declares `privacy.unit: record`. The update-level clip and noise still apply on top.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn

from federation.jobs import JobSpec


def steps_per_round(spec: JobSpec, n_train: int) -> int:
    hp = spec.hyperparameters
    steps = hp.epochs * math.ceil(n_train / hp.batch_size)
    return min(steps, hp.max_steps) if hp.max_steps is not None else steps


def record_epsilon(spec: JobSpec, n_train: int | None, rounds: int | None = None) -> float:
    """ε of DP-SGD over `rounds` rounds (default: all of the job's rounds) on `n_train` records."""
    p = spec.privacy
    if p.record_noise_multiplier is None:
        raise ValueError("the job has no record-level noise multiplier")
    if n_train is None or n_train <= 0:
        raise ValueError("record-level ε needs the number of training records")
    rounds = spec.rounds if rounds is None else rounds
    if rounds == 0:
        return 0.0
    q = min(1.0, spec.hyperparameters.batch_size / n_train)
    accountant = RDPAccountant()
    accountant.history = [(p.record_noise_multiplier, q, steps_per_round(spec, n_train) * rounds)]
    return float(accountant.get_epsilon(p.delta))


def train_dpsgd(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: JobSpec, seed: int) -> float:
    """DP-SGD for one round's local training; returns the mean batch loss."""
    p, hp = spec.privacy, spec.hyperparameters
    assert p.record_noise_multiplier is not None and p.record_clip_norm is not None
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y).float())
    loader = torch.utils.data.DataLoader(data, batch_size=hp.batch_size, generator=gen)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay,
                             momentum=hp.momentum)
    )
    model.train()  # Opacus refuses a module in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its non-cryptographic RNG and backward hooks
        engine = PrivacyEngine(accountant="rdp")
        private, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=p.record_noise_multiplier,
            max_grad_norm=p.record_clip_norm, noise_generator=gen,
        )
        loss_fn = nn.BCEWithLogitsLoss()
        losses: list[float] = []
        budget = steps_per_round(spec, len(y))
        private.train()
        while len(losses) < budget:
            for xb, yb in loader:
                if len(xb) == 0:
                    continue
                opt.zero_grad()
                loss = loss_fn(private(xb).squeeze(-1), yb)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if len(losses) >= budget:
                    break
    # Opacus wraps the module in place; copy the trained weights back to the plain model.
    model.load_state_dict({k.removeprefix("_module."): v for k, v in private.state_dict().items()})
    return float(np.mean(losses)) if losses else 0.0
