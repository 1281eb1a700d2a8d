"""A trainer written against the real FedML library: a subclass of `fedml.core.ClientTrainer`.

Used only by `make test-fedml` (tests/fedml/real_fedml_check.py), where it runs in `.venv-fedml`, the virtualenv
holding fedml 0.9.6 and its pins; the default test suite never imports fedml.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from fedml.core import ClientTrainer  # type: ignore[import-not-found]
from torch import nn


class FedMLLogRegTrainer(ClientTrainer):  # type: ignore[misc]
    """FedML's usual trainer shape: `self.model` trained by `train`, exchanged as a state dict."""

    def get_model_params(self) -> dict[str, torch.Tensor]:
        return self.model.cpu().state_dict()  # type: ignore[no-any-return]

    def set_model_params(self, model_parameters: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(model_parameters)

    def train(self, train_data: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, args: Any) -> None:
        model = self.model.to(device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in range(args.epochs):
            for x, y in train_data:
                opt.zero_grad()
                loss_fn(model(x.to(device)), y.to(device)).backward()
                opt.step()

    def test(self, test_data: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, args: Any) -> None:
        return None
