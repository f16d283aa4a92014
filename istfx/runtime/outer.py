"""An outer optimizer on the write-back: DiLoCo's Nesterov step on each round's change.

Each round, every element of a trained parameter moves from its value
before the round (``old``) to the reassembled value after it (``new``).
DiLoCo (Douillard et al. 2023) treats ``old - new`` as a pseudo-gradient and
applies an outer SGD step with Nesterov momentum to it::

    g   = old - new
    buf = g                      (first round)    buf = momentum * buf + g   (after)
    d   = g + momentum * buf     (Nesterov)       d = buf                    (plain momentum)
    p   = old - lr * d

exactly as ``torch.optim.SGD(lr=lr, momentum=momentum, nesterov=True)``
computes it when handed ``g`` as the gradient of ``old``. With
``lr=1, momentum=0`` the step is the plain write-back and is skipped, so the
model is bit for bit what reassembly wrote.

The momentum is stored per element, with its unit: :class:`FullOuter` keeps
it full-size where the full model is (the local backend, rank 0 of ps); under
the sharded topology the rank holding a unit's slice applies
:meth:`OuterStep.update` to it and the momentum moves with the slice.
Elements no accepted subnet trained this round are left alone (their
momentum too). Only floating-point trainable parameters take the step;
buffers (BatchNorm statistics) are written back as they are.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from istfx.core.slicing import RoundSlices
from istfx.errors import ISTError

__all__ = ["MOMENTUM_KEY", "FullOuter", "OuterStep"]

MOMENTUM_KEY = "outer_momentum"
"""The key under which the outer momentum travels with a unit's optimizer state (sharded)."""


class OuterStep:
    """The per-element outer update (see the module docstring).

    Args:
        lr: outer learning rate (DiLoCo: 0.7); 1 with ``momentum=0`` is the plain write-back.
        momentum: outer momentum (DiLoCo: 0.9).
        nesterov: Nesterov momentum (DiLoCo's choice) or plain heavy-ball.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = True) -> None:
        for label, value in (("outer lr", lr), ("outer momentum", momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ISTError(f"{label} must be a finite number, got {value!r}.")
        if lr <= 0:
            raise ISTError(f"outer lr must be > 0, got {lr!r} (1 with momentum 0 is the plain write-back).")
        if not 0 <= momentum < 1:
            raise ISTError(f"outer momentum must lie in [0, 1), got {momentum!r}.")
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)

    @property
    def identity(self) -> bool:
        """True when the step is the plain write-back (lr 1, momentum 0)."""
        return self.lr == 1.0 and self.momentum == 0.0

    def __repr__(self) -> str:
        return f"OuterStep(lr={self.lr:g}, momentum={self.momentum:g}, nesterov={self.nesterov})"

    def update(self, old: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stepped value of a tensor and its new momentum buffer.

        Args:
            old: the value before the round.
            new: the value training (and reassembly) produced.
            buffer: the momentum so far, None before the first step.
            mask: elements to step (bool, like `old`); the rest keep `new`
                and their momentum. None: every element.
        """
        if self.identity:
            return new, buffer
        with torch.no_grad():
            grad = old - new
            if self.momentum:
                if buffer is None:
                    stepped_buffer = grad.clone()
                else:
                    stepped_buffer = buffer.mul(self.momentum).add_(grad)
                direction = grad.add(stepped_buffer, alpha=self.momentum) if self.nesterov else stepped_buffer
            else:
                stepped_buffer, direction = None, grad
            value = old.add(direction, alpha=-self.lr)
            if mask is not None:
                value = torch.where(mask, value, new)
                if stepped_buffer is not None:
                    previous = buffer if buffer is not None else torch.zeros_like(stepped_buffer)
                    stepped_buffer = torch.where(mask, stepped_buffer, previous)
        return value, stepped_buffer


def held_mask(slices: RoundSlices, name: str, shape: Sequence[int], subnets: Iterable[int]) -> torch.Tensor:
    """Bool tensor of `shape`: True where one of `subnets` held an element of `name` in the round of `slices`."""
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    parts = []
    for s in subnets:
        held = tuple(len(i) if i is not None else size for size, i in zip(shape, slices.indices[s][name]))
        parts.append((s, torch.ones(held, dtype=torch.bool), 1.0))
    slices.put(name, mask, parts)
    return mask


class FullOuter:
    """The outer step over a full model in one process, momentum kept full-size.

    Usage, around each round::

        outer = FullOuter(OuterStep(0.7, 0.9))
        outer.begin(tensors)                       # name -> the model's tensor, before the round
        ... run the round (reassembly writes into the same tensors) ...
        outer.finish(tensors, slices, holders)     # holders: subnet -> names it trained (accepted only)
    """

    def __init__(self, step: OuterStep) -> None:
        self.step = step
        self.momentum: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """False for the plain write-back (nothing to keep, nothing to do)."""
        return not self.step.identity

    def begin(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Remember the values before the round (floating-point tensors only)."""
        if not self.active:
            return
        self._before = {n: t.detach().clone() for n, t in tensors.items() if t.is_floating_point()}

    def finish(self, tensors: Mapping[str, torch.Tensor], slices: RoundSlices,
               holders: Mapping[int, Iterable[str]]) -> None:
        """Step every tensor in place from its remembered value; `holders`: subnet -> names it trained."""
        if not self.active:
            return
        if not self._before:
            raise ISTError("FullOuter.finish called without begin: call begin(tensors) before the round.")
        held_by: dict[str, list[int]] = {}
        for subnet, names in holders.items():
            for name in names:
                held_by.setdefault(name, []).append(subnet)
        with torch.no_grad():
            for name, old in self._before.items():
                subnets = held_by.get(name)
                if not subnets:
                    continue
                target = tensors[name]
                mask = held_mask(slices, name, old.shape, subnets).to(old.device)
                value, buffer = self.step.update(old, target.detach(), self.momentum.get(name),
                                                 None if bool(mask.all()) else mask)
                target.copy_(value)
                if buffer is not None:
                    self.momentum[name] = buffer
        self._before = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the momentum kept."""
        return sum(t.numel() * t.element_size() for t in self.momentum.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The momentum, for a checkpoint."""
        return dict(self.momentum)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.momentum = {n: t.clone() for n, t in tensors.items()}
