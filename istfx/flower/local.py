"""A client's local training: L optimizer steps on its own batches, as ``istfx.fit`` takes them.

The steps are those of :class:`istfx.runtime.backend_api.OptimizerStep`
(forward, mean loss, backward, step, zero the gradients), and samples are
counted as ``fit`` counts them (class targets equal to the ignore index are
not samples), so a federated round and a ``fit`` round on the same batches
give the same weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from istfx.runtime.backend_api import OptimizerStep
from istfx.runtime.data import IGNORE_INDEX

__all__ = ["LocalResult", "count_samples", "train_steps"]


@dataclass
class LocalResult:
    """What local training measured: samples, summed loss, optimizer steps and seconds."""

    samples: int
    loss_sum: float
    steps: int
    seconds: float

    @property
    def loss(self) -> float:
        """Mean training loss over the samples (nan without samples)."""
        return self.loss_sum / self.samples if self.samples else float("nan")


def count_samples(targets: Any) -> int:
    """Samples in a batch's targets: labels other than the ignore index, else the leading dimension."""
    if isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point():
        return int((targets != IGNORE_INDEX).sum())
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return targets.shape[0]
    return 1


def train_steps(module: nn.Module, parameters: Sequence[nn.Parameter], batches: Sequence[Any],
                build_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                loss_fn: Callable[[Any, Any], torch.Tensor]) -> LocalResult:
    """One optimizer step per batch of `batches` on `module` (in training mode), over `parameters`.

    The returned seconds time the steps only: the optimizer is built before the
    timer starts, because the first torch optimizer of a process imports
    ``torch._dynamo`` (seconds), which an IST client has already paid in
    ``istfx.compile`` and a FedAvg client would otherwise pay inside the timer.
    """
    module.train()
    stepper = OptimizerStep(module, build_optimizer(list(parameters)))
    begin = time.perf_counter()
    samples, loss_sum = 0, 0.0
    for inputs, targets in batches:
        loss = loss_fn(stepper.forward(inputs), targets)
        stepper.backward(loss)
        stepper.step()
        n = count_samples(targets)
        samples += n
        loss_sum += float(loss.detach()) * n
    return LocalResult(samples, loss_sum, len(batches), time.perf_counter() - begin)
