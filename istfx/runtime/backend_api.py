"""The backend contract: what :func:`istfx.runtime.training.fit` asks of a backend, and the types both share.

A backend runs IST rounds: it cuts the model into subnets
(``ist.decompose(round)``), has each subnet trained by the *local-training
closure* ``train_subnet(slot, subnet) -> SubnetResult`` that ``fit`` hands it,
and writes the trained subnets back (``ist.reassemble``). Everything else
``fit`` needs from a backend is a method of :class:`Backend` with a default
that is right for a backend training every subnet in this process; a
distributed backend overrides the ones that differ. ``fit`` calls nothing
else and probes for nothing.

A minimal backend::

    from istfx.runtime.backend_api import Backend, RoundResult, subnet_bytes, subnet_parameters

    class Sequential(Backend):
        name = "sequential"

        def run_round(self, ist, round, train_subnet):
            subnets = ist.decompose(round)
            results = [train_subnet(i, s) for i, s in enumerate(subnets)]
            report = ist.reassemble(subnets, weights=[max(r.samples, 1) for r in results])
            return RoundResult(round, results, report, [subnet_parameters(s) for s in subnets],
                               [subnet_bytes(s) for s in subnets])

    istfx.fit(ist, data, rounds=10, local_steps=5, backend=Sequential())

This module sits low in the runtime (it imports only the core and the
checkpoint module) so that the training loop and every backend import it.
The runtime imports no backend: backends register a name
(:func:`register_backend`); :func:`resolve_backend` turns ``"local"``,
``"torch"`` or ``"deepspeed"`` into an instance, importing the
``istfx.backends`` package (which registers those three) by name the first
time one is asked for.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from istfx.core.compiler import ISTModel, ReassembleReport
from istfx.errors import ISTError
from istfx.runtime import checkpoint as ckpt
from istfx.runtime.state_travel import StateConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "OptimizerStep",
    "RankState",
    "RoundResult",
    "StepperFactory",
    "SubnetResult",
    "SubnetStepper",
    "TrainSubnet",
    "call_model",
    "model_device",
    "model_parameter_bytes",
    "register_backend",
    "resolve_backend",
    "subnet_bytes",
    "subnet_parameters",
]


# -- what a round produces ----------------------------------------------------------------------
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
    """Everything one round produced: per-subnet results, sizes and the reassembly report.

    ``extra`` holds backend-specific measurements (bytes sent and received per
    rank, memory, failed ranks, ...); ``fit`` copies them into the round's
    metrics row.
    """

    round: int
    results: list[SubnetResult]
    report: ReassembleReport
    parameters_per_subnet: list[int]
    bytes_per_subnet: list[int]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

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
    def steps(self) -> int:
        """Optimizer steps of the subnet that took the most this round."""
        return max((r.steps for r in self.results), default=0)

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


RankState = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""One rank's saved state in a checkpoint: ``(metadata, tensors)`` (data positions; RNG state)."""


# -- sizes ---------------------------------------------------------------------------------------
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


def model_parameter_bytes(ist: ISTModel) -> int:
    """Bytes of the full model's parameters (from the plan: also right when the model is on ``meta``)."""
    plan = ist.plan
    return sum(math.prod(plan.state_shapes[n]) * ist.state_tensor(n).element_size()
               for n, kind in plan.state_kinds.items() if kind == "parameter")


def model_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU if it has none)."""
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


# -- how a subnet takes optimizer steps ------------------------------------------------------------
def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


class SubnetStepper(Protocol):
    """One subnet's optimizer steps, as the local-training loop drives them.

    For each of ``local_steps`` steps the loop draws
    :attr:`Backend.draws_per_step` batches; for each draw ``d`` with
    ``computes(d)`` it calls ``forward``, then ``backward`` on the loss;
    after the draws, ``step()``. After the last step, ``finish()``.
    """

    def computes(self, draw: int) -> bool:
        """Whether this process computes draw `draw` of a step (each data-parallel rank its share)."""
        ...

    def forward(self, inputs: Any) -> Any:
        """The subnet's outputs for a batch's inputs."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one draw's loss."""
        ...

    def step(self) -> None:
        """Apply the step after its draws."""
        ...

    def finish(self) -> None:
        """Leave the trained values in the subnet's own tensors."""
        ...


StepperFactory = Callable[[nn.Module, torch.optim.Optimizer], SubnetStepper]
"""``make_stepper(subnet, optimizer) -> SubnetStepper``."""


class OptimizerStep:
    """Plain PyTorch steps: one batch per step, ``loss.backward()``, ``optimizer.step()``."""

    def __init__(self, subnet: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.subnet, self.optimizer = subnet, optimizer
        optimizer.zero_grad(set_to_none=True)

    def computes(self, draw: int) -> bool:
        return True

    def forward(self, inputs: Any) -> Any:
        return call_model(self.subnet, inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> None:
        pass


# -- the contract ------------------------------------------------------------------------------------
class Backend(ABC):
    """Runs IST rounds; the complete list of what :func:`~istfx.runtime.training.fit` uses.

    Subclasses implement :meth:`run_round`. The other methods have defaults
    for a backend that trains every subnet in this process and holds the full
    model in ``ist.model``; a distributed backend overrides those that differ
    (every rank calls ``fit`` with the same arguments, and each method below
    is called on every rank at the same point).

    ``fit`` calls, in order: :meth:`prepare` once (with the checkpoint it
    resumes from, if any), :attr:`is_main`, :meth:`trained_slots` (the data
    streams to replay and to record in checkpoints); then per round
    :meth:`run_round` (with a closure that steps each subnet through
    :meth:`make_stepper`, :attr:`draws_per_step` batches per step),
    :meth:`full_model` around evaluation, :meth:`save_checkpoint` when a
    checkpoint is due, :meth:`ranks` for the byte comparison; at the end
    :meth:`finish`. Only the process with :attr:`is_main` writes metrics and
    calls the callback; every process takes part in evaluation and
    checkpoints.
    """

    name: ClassVar[str] = "backend"
    """Short name, recorded in checkpoint manifests."""

    topology: str | None = None
    """How the ranks are organised (``"ps"``, ``"sharded"``), recorded in checkpoint manifests; None here."""

    checkpoints_carried_state: ClassVar[bool] = False
    """Whether :meth:`save_checkpoint` stores the carried optimizer state and outer momentum (so that ``fit``
    may resume runs that keep them)."""

    state_config: StateConfig = StateConfig()
    """What the backend keeps between rounds (set by :meth:`configure_state`): reset state, plain write-back."""

    # -- identity ---------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this process logs, evaluates and writes metrics (rank 0)."""
        return True

    def trained_slots(self, ist: ISTModel) -> list[int]:
        """The subnet slots whose batches this process draws (default: every slot)."""
        return list(range(ist.plan.subnets))

    def ranks(self, ist: ISTModel) -> int:
        """Processes a round runs on: data parallel over as many is the byte comparison's baseline."""
        return ist.plan.subnets

    # -- training -------------------------------------------------------------------------------
    @property
    def draws_per_step(self) -> int:
        """Batches of a subnet's stream one optimizer step consumes (data-parallel ranks x accumulation)."""
        return 1

    def make_stepper(self, subnet: nn.Module, optimizer: torch.optim.Optimizer) -> SubnetStepper:
        """How `subnet` takes its optimizer steps this round (default: plain PyTorch, :class:`OptimizerStep`)."""
        return OptimizerStep(subnet, optimizer)

    def configure_state(self, config: StateConfig) -> None:
        """Keep optimizer state and/or take the outer step across rounds (``fit(optimizer_state=...,
        outer_lr=..., outer_momentum=...)``; called once, before :meth:`prepare`, on every process).

        A backend that supports it hands each subnet its carried state with
        :func:`istfx.runtime.optim_state.attach` and takes back
        ``SubnetResult.optimizer_state`` (:mod:`istfx.runtime.state_travel`).
        Default: only the plain configuration is accepted.
        """
        if not config.plain:
            raise ISTError(f"the {self.name!r} backend keeps no optimizer state or outer momentum between rounds: "
                           "use optimizer_state='reset', outer_lr=1 and outer_momentum=0 with it, or a backend "
                           "that implements configure_state (local, torch ps/sharded, deepspeed).")
        self.state_config = config

    def prepare(self, ist: ISTModel, start_round: int = 0,
                checkpoint: ckpt.Checkpoint | None = None) -> RankState | None:
        """Get ready to run rounds from `start_round`; return this process's saved state, if any.

        Default: load `checkpoint` into ``ist.model`` and return rank 0's
        saved ``(metadata, tensors)``; nothing to do without a checkpoint.
        """
        if checkpoint is None:
            return None
        ckpt.load_into(ist, checkpoint)
        return checkpoint.rank_state(0)

    @abstractmethod
    def run_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Decompose `ist` for `round`, train every subnet with `train_subnet`, reassemble."""

    @contextlib.contextmanager
    def full_model(self, ist: ISTModel) -> Iterator[nn.Module | None]:
        """The full model for evaluation on the main process (None elsewhere); every process enters it."""
        yield ist.model

    def save_checkpoint(self, ist: ISTModel, root: str | os.PathLike, round: int, rank_state: dict[str, Any],
                        manifest: dict[str, Any], keep: int | None = None) -> None:
        """Write the checkpoint of `round` under `root` (after the round; every process calls this).

        `rank_state` is this process's data positions (and what else ``fit``
        keeps), `manifest` the run's description. Default: the full model,
        rank 0's state and RNG, then the manifest.
        """
        directory = ckpt.round_dir(root, round)
        ckpt.save_full(ist, directory, round)
        ckpt.save_rank(directory, 0, rank_state)
        ckpt.write_manifest(root, round, {**manifest, "format": ckpt.FULL, "world_size": 1}, keep)

    def finish(self, ist: ISTModel) -> None:
        """End of training: leave the trained model in ``ist.model`` on the main process."""

    def close(self) -> None:
        """Release what the backend holds (process groups, threads); the default holds nothing."""


# -- backends by name ------------------------------------------------------------------------------
BACKENDS: dict[str, Callable[[], Backend]] = {}
"""Backends known by name -> factory. ``istfx.backends`` registers ``local``, ``torch`` and ``deepspeed``."""

_BUILTIN_PACKAGE = "istfx.backends"


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``fit(..., backend=name)`` build ``factory()``."""
    BACKENDS[name.strip().lower()] = factory


def resolve_backend(backend: str | Backend) -> Backend:
    """A backend instance from its name (``"local"``) or the instance itself.

    The built-in backends live in a layer above the runtime, so the runtime
    cannot import them: they register themselves (:func:`register_backend`)
    when ``istfx.backends`` is imported, which a name that is not yet
    registered triggers here, once.
    """
    if isinstance(backend, str):
        key = backend.strip().lower()
        if key not in BACKENDS:
            importlib.import_module(_BUILTIN_PACKAGE)
        names = ", ".join(repr(k) for k in sorted(BACKENDS))
        if key not in BACKENDS:
            raise ISTError(
                f"unknown backend {backend!r}: use one of {names}, or pass an instance of a subclass of "
                "istfx.backends.Backend (it implements run_round(ist, round, train_subnet))."
            )
        return BACKENDS[key]()
    if not isinstance(backend, Backend):
        importlib.import_module(_BUILTIN_PACKAGE)
        names = ", ".join(repr(k) for k in sorted(BACKENDS))
        raise ISTError(
            f"backend must be a name ({names}) or an instance of a subclass of istfx.backends.Backend "
            f"(it implements run_round(ist, round, train_subnet)), got {type(backend).__name__}."
        )
    return backend
