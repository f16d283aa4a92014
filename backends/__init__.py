"""Backends: where the subnets of a round are trained.

A backend runs one IST round: it cuts the model into subnets
(``ist.decompose(round)``), has each subnet trained by a *local-training
closure*, and writes the trained subnets back (``ist.reassemble``). The closure
is the same whichever backend runs it, so a training loop written once runs
in this process (:class:`LocalBackend`), on torch.distributed ranks
(:class:`TorchDistBackend`: :class:`TorchPSBackend` or
:class:`TorchShardedBackend`) or under DeepSpeed engines
(:class:`DeepSpeedBackend`).

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

A new backend subclasses :class:`Backend` (the contract ``fit`` relies on,
defined in :mod:`istfx.runtime.backend_api`, with defaults) and implements
``run_round``; copy ``backends/local.py`` for one process, or subclass
:class:`TorchDistBackend` (``backends/torch_base.py``) for a torch.distributed
topology.
"""
from __future__ import annotations

from istfx.runtime.backend_api import (
    BACKENDS,
    Backend,
    RoundResult,
    SubnetResult,
    TrainSubnet,
    model_device,
    register_backend,
    resolve_backend,
    subnet_bytes,
    subnet_parameters,
)

from .local import LocalBackend
from .torch_base import TorchDistBackend
from .torch_ps import TorchPSBackend
from .torch_sharded import TorchShardedBackend
from .deepspeed_engine import DeepSpeedBackend  # imports DeepSpeed only when a run starts

register_backend("local", LocalBackend)
register_backend("torch", TorchDistBackend)  # the ps topology
register_backend("deepspeed", DeepSpeedBackend)

get_backend = resolve_backend
"""A backend instance from its name (``"local"``, ``"torch"``, ``"deepspeed"``) or the instance itself."""


__all__ = [
    "BACKENDS",
    "Backend",
    "DeepSpeedBackend",
    "LocalBackend",
    "RoundResult",
    "SubnetResult",
    "TorchDistBackend",
    "TorchPSBackend",
    "TorchShardedBackend",
    "TrainSubnet",
    "get_backend",
    "model_device",
    "subnet_bytes",
    "subnet_parameters",
]
