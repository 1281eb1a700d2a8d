"""Record-level DP (the patient unit): DP-SGD for one round of local training.

DP-SGD (Abadi et al. 2016) with Opacus's per-example gradients and clipping (`GradSampleModule`, `DPOptimizer`):
each step trains on a Poisson sample of the site's records, clips every record's gradient to `record_clip_norm`
and adds Gaussian noise to their sum. Both random draws the guarantee rests on — who is in a batch, and the noise —
come from the OS's CSPRNG (`federation.noise`), fresh every step, so nobody who knows the job (its seed, the
site, the round) can regenerate them. Opacus's own `secure_mode` would need `torchcsprng`, which has no build for
torch 2.13; its DP-SGD pieces are used as they are, with the noise drawn here instead.

The site's plan (σ, sampling rate, steps) is `agent.record_plan.RecordPlan`.

With distributed per-patient noise (`privacy.record_noise: distributed`) a site adds no noise while training:
`clipped_gradient_step` takes one step on the sum of its records' clipped gradients, and the noise is this site's
share of the secure sum's (`agent.privacy`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from agent.record_plan import RecordPlan
from agent.trainer import TrainingStoppedError
from federation import noise
from federation.jobs import Hyperparameters, JobSpec


class CsprngDPOptimizer(DPOptimizer):  # type: ignore[misc]  # Opacus ships no type hints
    """Opacus's DP-SGD optimizer with its Gaussian noise drawn from the OS's CSPRNG (`federation.noise`)."""

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            std = self.noise_multiplier * self.max_grad_norm
            p.grad = (p.summed_grad + noise.gaussian_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)


def _optimizer(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay,
                           momentum=hp.momentum)


def train_dpsgd(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: JobSpec, plan: RecordPlan,
                should_stop: Callable[[], bool] | None = None) -> float:
    """One round of DP-SGD on this site's records, in place; returns the mean loss of the non-empty batches.

    Every one of the plan's steps is taken, an empty Poisson sample included (its update is noise alone): skipping
    it would reveal that the sample was empty, and the accountant counts every step. `should_stop` is asked before
    each step: when it says so, `TrainingStoppedError` is raised and nothing of the round may be released."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    model.train()  # Opacus refuses a module in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its own non-cryptographic RNG, unused here
        private = GradSampleModule(model, loss_reduction="mean")
        opt = CsprngDPOptimizer(
            _optimizer(model, spec.hyperparameters), noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.clip_norm, expected_batch_size=max(1, round(plan.sampling_rate * plan.records)),
            loss_reduction="mean",
        )
    losses: list[float] = []
    with warnings.catch_warnings():
        # torch notes that Opacus's backward hooks fire on a module whose inputs need no gradient: expected here.
        warnings.simplefilter("ignore", UserWarning)
        try:
            _steps(private, opt, xt, yt, plan, losses, should_stop)
        finally:
            private._close()  # remove Opacus's hooks and per-example gradients: the model is a plain module again
    return float(np.mean(losses)) if losses else 0.0


def _steps(private: GradSampleModule, opt: DPOptimizer, xt: torch.Tensor, yt: torch.Tensor, plan: RecordPlan,
           losses: list[float], should_stop: Callable[[], bool] | None) -> None:
    loss_fn = nn.BCEWithLogitsLoss()
    for step in range(plan.steps_per_round):
        if should_stop is not None and should_stop():
            raise TrainingStoppedError(f"stopped after {step} of {plan.steps_per_round} DP-SGD steps")
        idx = torch.from_numpy(noise.poisson_sample(plan.records, plan.sampling_rate))
        opt.zero_grad(set_to_none=True)
        if len(idx) == 0:
            for p in private.parameters():  # an empty sample: no gradient, so the step is noise alone
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            loss = loss_fn(private(xt[idx]).squeeze(-1), yt[idx])
            loss.backward()
            losses.append(float(loss.detach()))
        opt.step()


CHUNK = 256  # records per pass of per-example gradients: memory O(CHUNK × parameters), whatever the site's size


def clipped_gradient_step(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: JobSpec,
                          should_stop: Callable[[], bool] | None = None) -> float:
    """One step of −learning_rate / batch_size × the sum of every training record's gradient clipped to
    `record_clip_norm` (Opacus's per-example gradients, `CHUNK` records at a time), in place; returns the mean
    loss. No noise: the update leaves this site only masked, with this site's share of the sum's noise added.
    `should_stop` is asked before each chunk (`TrainingStoppedError`: the model is left as it was)."""
    c, hp = spec.privacy.record_clip_norm, spec.hyperparameters
    assert c is not None  # PrivacySpec requires it for the record unit
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    model.train()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's notes on its RNG and on hooks of inputs without gradients
        private = GradSampleModule(model, loss_reduction="sum")
        try:
            params = [p for p in private.parameters() if p.requires_grad]
            total = [torch.zeros_like(p) for p in params]
            loss_sum = 0.0
            for start in range(0, len(yt), CHUNK):
                if should_stop is not None and should_stop():
                    raise TrainingStoppedError(f"stopped after {start} of {len(yt)} records' gradients")
                private.zero_grad(set_to_none=True)
                loss = loss_fn(private(xt[start:start + CHUNK]).squeeze(-1), yt[start:start + CHUNK])
                loss.backward()
                n = min(CHUNK, len(yt) - start)
                norms = torch.cat([p.grad_sample.reshape(n, -1) for p in params], dim=1).norm(dim=1)
                factor = torch.clamp(c / (norms + 1e-12), max=1.0)
                for acc, p in zip(total, params, strict=True):
                    acc += torch.einsum("i,i...->...", factor, p.grad_sample)
                loss_sum += float(loss.detach())
            with torch.no_grad():
                for acc, p in zip(total, params, strict=True):
                    p.add_(acc, alpha=-hp.learning_rate / hp.batch_size)
        finally:
            private._close()
    return loss_sum / max(1, len(yt))
