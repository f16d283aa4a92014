"""Backends: where the subnets of a round are trained.

A backend runs one IST round: it cuts the model into subnets
(``ist.decompose(round)``), has each subnet trained by a *local-training
closure*, and writes the trained subnets back (``ist.reassemble``). The closure
is the same whichever backend runs it, so a training loop written once runs
in this process (:class:`LocalBackend`), on torch.distributed ranks
(:class:`TorchDistBackend`) or under DeepSpeed engines (:class:`DeepSpeedBackend`).

Usage::

    from istfx.backends import LocalBackend, SubnetResult

    def train_subnet(index, subnet):
        ...                                   # a few optimizer steps
        return SubnetResult(samples=256, loss_sum=12.3, correct=200, steps=2)

    result = LocalBackend().run_round(ist, 0, train_subnet)
    result.report.rejected                    # subnets refused for NaN/Inf values
    result.bytes_per_subnet                   # what a worker receives and sends back

The closure receives the subnet slot and the subnet module (parameters named
as in the user's model, e.g. ``layers.0.weight``) and returns a
:class:`SubnetResult`. It may move the subnet to another device; the backend
brings it back to the model's device before reassembly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from istfx.core.compiler import ISTModel, ReassembleReport
from istfx.errors import ISTError


@dataclass
class SubnetResult:
    """What one subnet's local training reports back.

    Attributes:
        samples: training samples the subnet saw this round (its weight when
            shared parameters are averaged).
        loss_sum: sum over those samples of the loss (batch mean loss times
            batch size, summed over steps).
        correct: correctly classified samples, or None when the outputs are
            not class logits.
        steps: optimizer steps taken.
        optimizer_state: optional per-parameter optimizer state of the
            subnet after training, ``{parameter name: {key: value}}``, for
            callers that carry optimizer state across rounds.
    """

    samples: int
    loss_sum: float
    correct: int | None
    steps: int
    optimizer_state: dict[str, dict[str, Any]] | None = None


TrainSubnet = Callable[[int, nn.Module], SubnetResult]
"""The local-training closure: ``train_subnet(subnet_index, subnet) -> SubnetResult``."""


@dataclass
class RoundResult:
    """Everything one round produced: per-subnet results, sizes and the reassembly report."""

    round: int
    results: list[SubnetResult]
    report: ReassembleReport
    parameters_per_subnet: list[int]
    bytes_per_subnet: list[int]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific measurements

    @property
    def accepted_results(self) -> list[SubnetResult]:
        """Results of the subnets whose update was written back."""
        accepted = set(self.report.accepted)
        return [r for i, r in enumerate(self.results) if i in accepted]

    @property
    def samples(self) -> int:
        """Samples seen by all subnets this round (rejected ones included)."""
        return sum(r.samples for r in self.results)

    @property
    def loss(self) -> float:
        """Mean training loss per sample over the accepted subnets (NaN if none)."""
        results = self.accepted_results
        n = sum(r.samples for r in results)
        return sum(r.loss_sum for r in results) / n if n else math.nan

    @property
    def accuracy(self) -> float | None:
        """Training accuracy over the accepted subnets, or None when not a classification."""
        results = [r for r in self.accepted_results if r.correct is not None]
        n = sum(r.samples for r in results)
        if not results or not n:
            return None
        return sum(r.correct for r in results) / n


@runtime_checkable
class Backend(Protocol):
    """Runs IST rounds. Implementations differ only in where subnets train."""

    name: str

    def run_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Decompose `ist` for `round`, train every subnet with `train_subnet`, reassemble."""
        ...


def subnet_parameters(module: nn.Module) -> int:
    """Number of parameter elements a subnet holds."""
    return sum(p.numel() for p in module.parameters())


def subnet_bytes(module: nn.Module) -> int:
    """Bytes of a subnet's parameters and buffers: what a worker receives and sends back."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU if it has none)."""
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


from .local import LocalBackend
from .torch_dist import TorchDistBackend
from .deepspeed_engine import DeepSpeedBackend  # imports DeepSpeed only when a run starts

BACKENDS: dict[str, Callable[[], Backend]] = {"local": LocalBackend, "torch": TorchDistBackend,
                                              "deepspeed": DeepSpeedBackend}
"""Backends known by name."""


def get_backend(backend: str | Backend) -> Backend:
    """A backend instance from its name (``"local"``) or the instance itself."""
    if isinstance(backend, str):
        key = backend.strip().lower()
        if key not in BACKENDS:
            raise ISTError(
                f"unknown backend {backend!r}: use one of {', '.join(repr(k) for k in sorted(BACKENDS))}, "
                "or pass an object with a run_round(ist, round, train_subnet) method."
            )
        return BACKENDS[key]()
    if not callable(getattr(backend, "run_round", None)):
        raise ISTError(
            f"backend must be a name ({', '.join(repr(k) for k in sorted(BACKENDS))}) or an object with a "
            f"run_round(ist, round, train_subnet) method, got {type(backend).__name__}."
        )
    return backend


__all__ = [
    "BACKENDS",
    "Backend",
    "DeepSpeedBackend",
    "LocalBackend",
    "RoundResult",
    "SubnetResult",
    "TorchDistBackend",
    "TrainSubnet",
    "get_backend",
    "model_device",
    "subnet_bytes",
    "subnet_parameters",
]
