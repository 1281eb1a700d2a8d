"""Trainers written against FedML's `ClientTrainer` interface, without importing `fedml` (duck typing).

`SgdTrainer` is what a FedML Octopus user typically has: it keeps the model it was built with, trains it with the
optimizer `args` names, and hands its `state_dict()` back. The others misbehave in one way each, so the tests can
check that the adapter refuses what does not fit the job's model and that clipping bounds whatever comes back.
The agent loads this file by path (pinned by its sha256), so it imports nothing from the project.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class SgdTrainer:
    """A plain FedML-style trainer: `train(train_data, device, args)` over (x, y) batches."""

    def __init__(self, model: nn.Module, args: Any) -> None:
        self.model = model
        self.args = args
        self.id = 0

    def get_model_params(self) -> dict[str, torch.Tensor]:
        return self.model.cpu().state_dict()

    def set_model_params(self, model_parameters: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(model_parameters)

    def train(self, train_data: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, args: Any) -> None:
        model = self.model.to(device)
        model.train()
        opt: torch.optim.Optimizer
        if args.client_optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in range(args.epochs):
            for x, y in train_data:
                opt.zero_grad()
                loss_fn(model(x.to(device)), y.to(device)).backward()
                opt.step()

    def test(self, test_data: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             args: Any) -> dict[str, float]:
        model = self.model.to(device)
        model.eval()
        total, correct = 0, 0
        with torch.no_grad():
            for x, y in test_data:
                correct += int(((model(x) > 0).float() == y).sum())
                total += len(y)
        return {"test_correct": float(correct), "test_total": float(total)}


class HugeTrainer(SgdTrainer):
    """Returns parameters a million away from the global model: only the clip keeps the update bounded."""

    def get_model_params(self) -> dict[str, torch.Tensor]:
        return {k: v + 1e6 for k, v in super().get_model_params().items()}


class NanTrainer(SgdTrainer):
    def get_model_params(self) -> dict[str, torch.Tensor]:
        params = dict(super().get_model_params())
        params["0.bias"] = torch.full_like(params["0.bias"], float("nan"))
        return params


class WrongShapeTrainer(SgdTrainer):
    def get_model_params(self) -> dict[str, torch.Tensor]:
        params = dict(super().get_model_params())
        params["0.weight"] = torch.zeros(1, 3)
        return params


class WrongDtypeTrainer(SgdTrainer):
    def get_model_params(self) -> dict[str, torch.Tensor]:
        return {k: v.double() for k, v in super().get_model_params().items()}


class RenamingTrainer(SgdTrainer):
    """Hands back its parameters under other names (as a wrapped model would: `model.0.weight`)."""

    def get_model_params(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in super().get_model_params().items()}


class RaisingTrainer(SgdTrainer):
    def train(self, train_data: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, args: Any) -> None:
        raise RuntimeError("patient 4711's record is malformed")  # must stay in the site's log


class ChattyTrainer(SgdTrainer):
    """Prints to stdout while training, as FedML code does: it must not corrupt a trainer process's response."""

    def train(self, train_data: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, args: Any) -> None:
        print("epoch 0: loss 0.69 (PK\x03\x04 looks like a zip header)")
        super().train(train_data, device, args)


class NotATrainer:
    """Lacks `train` and `test`."""

    def __init__(self, model: nn.Module, args: Any) -> None:
        self.model = model

    def get_model_params(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def set_model_params(self, model_parameters: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(model_parameters)
