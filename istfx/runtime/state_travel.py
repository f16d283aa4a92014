"""What a backend keeps between rounds besides the model: optimizer state and outer momentum.

A backend is configured once (:class:`StateConfig`: optimizer state
``"reset"`` or ``"carry"``, and the outer step) and keeps, round after round:

- where the full model is (the local backend; rank 0 of the ps topology and
  of DeepSpeed), a :class:`CentralState`: the full-size optimizer state
  (:class:`~istfx.runtime.optim_state.FullState`), cut for each subnet and
  written back after the round, and the outer momentum
  (:class:`~istfx.runtime.outer.FullOuter`), applied after reassembly;
- under the sharded topology, per rank, the state of the slices it holds
  (:class:`~istfx.runtime.optim_state.HeldState`), moved with the units by
  the backend's exchange, and the outer momentum next to it (key
  :data:`~istfx.runtime.outer.MOMENTUM_KEY`).

Each round the backend hands a subnet its starting state with
:func:`istfx.runtime.optim_state.attach`; the local-training closure loads it
into its optimizer and returns the trained state in
``SubnetResult.optimizer_state``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from istfx.core.compiler import ISTModel
from istfx.core.slicing import RoundSlices
from istfx.runtime.optim_state import FullState, StateDict, check_mode
from istfx.runtime.outer import FullOuter, OuterStep

__all__ = ["CentralState", "StateConfig", "outer_names"]


@dataclass(frozen=True)
class StateConfig:
    """How optimizer state and the write-back behave across rounds.

    Attributes:
        optimizer_state: ``"reset"`` (a fresh optimizer per subnet per round)
            or ``"carry"`` (state travels with its units).
        outer_lr, outer_momentum: the outer Nesterov step (1 and 0: the plain write-back).
    """

    optimizer_state: str = "reset"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer_state", check_mode(self.optimizer_state))
        OuterStep(self.outer_lr, self.outer_momentum)  # refuses bad values

    @property
    def carry(self) -> bool:
        return self.optimizer_state == "carry"

    @property
    def outer(self) -> OuterStep:
        return OuterStep(self.outer_lr, self.outer_momentum)

    @property
    def plain(self) -> bool:
        """True when nothing is kept between rounds (reset state, plain write-back)."""
        return not self.carry and self.outer.identity


def outer_names(ist: ISTModel) -> list[str]:
    """The tensors the outer step applies to: trainable floating-point parameters (not buffers)."""
    out = []
    for name, kind in ist.plan.state_kinds.items():
        if kind != "parameter":
            continue
        tensor = ist.state_tensor(name)
        if tensor.requires_grad and tensor.is_floating_point():
            out.append(name)
    return out


class CentralState:
    """Optimizer state and outer momentum where the full model is (local; rank 0 of ps and DeepSpeed).

    Usage, around a round::

        central.begin(ist)                                   # before training
        attach(subnet, central.for_subnet(slices, slot, names))
        ... train, reassemble ...
        central.finish(ist, slices, {slot: result.optimizer_state}, {slot: names})   # accepted slots only
    """

    def __init__(self, ist: ISTModel, config: StateConfig) -> None:
        self.config = config
        self.state = FullState(ist.plan.state_shapes) if config.carry else None
        self.outer = FullOuter(config.outer)
        self.names = outer_names(ist) if self.outer.active else []

    def begin(self, ist: ISTModel) -> None:
        """Remember the model's values before the round (for the outer step)."""
        if self.outer.active:
            self.outer.begin({n: ist.state_tensor(n) for n in self.names})

    def for_subnet(self, slices: RoundSlices, slot: int, names: Iterable[str] | None = None) -> StateDict | None:
        """The state slot `slot` starts the round with (None: a fresh optimizer)."""
        if self.state is None or not self.state:
            return None
        return self.state.for_subnet(slices, slot, names)

    def finish(self, ist: ISTModel, slices: RoundSlices, states: Mapping[int, StateDict | None],
               holders: Mapping[int, Iterable[str]], weights: Mapping[int, float] | None = None) -> None:
        """After reassembly: write the accepted slots' trained state back, then take the outer step.

        `states` and `holders` (slot -> names it trained) hold accepted slots
        only; `weights` (samples) average state that several slots trained.
        """
        if self.state is not None:
            self.state.write_back(slices, [(s, st, float((weights or {}).get(s, 1.0)))
                                           for s, st in sorted(states.items()) if st])
        if self.outer.active:
            self.outer.finish({n: ist.state_tensor(n) for n in self.names}, slices,
                              {s: list(names) for s, names in holders.items()})

    @property
    def nbytes(self) -> int:
        """Bytes kept: full-size optimizer state and outer momentum."""
        return (self.state.nbytes if self.state is not None else 0) + self.outer.nbytes

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything kept, for a checkpoint: ``optim/NAME::KEY`` and ``outer/NAME``."""
        out = {f"optim/{k}": v for k, v in (self.state.state_dict() if self.state is not None else {}).items()}
        out.update({f"outer/{k}": v for k, v in self.outer.state_dict().items()})
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if self.state is not None:
            self.state.load_state_dict({k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")})
        self.outer.load_state_dict({k[len("outer/"):]: v for k, v in tensors.items() if k.startswith("outer/")})
