"""How subnets are optimized: the inner optimizer, its schedule, clipping, state travel and the outer step.

One :class:`TrainingRecipe` holds what people set when training a
transformer (optimizer, learning rate, weight decay, betas, warm-up, cosine
or constant schedule, gradient clipping) plus IST's own two choices: whether
optimizer state travels with its units (``optimizer_state="carry"``) or
starts fresh every round (``"reset"``), and the outer step on the write-back
(``outer_lr``, ``outer_momentum``; :mod:`istfx.runtime.outer`).

Usage::

    recipe = TrainingRecipe(optimizer="adamw", lr=3e-3, weight_decay=0.1, warmup_steps=100,
                            lr_schedule="cosine", clip_grad_norm=1.0, optimizer_state="carry",
                            outer_lr=0.7, outer_momentum=0.9)
    fit(ist, data, rounds=R, local_steps=L, **recipe.fit_kwargs(total_steps=R * L))

:func:`from_args` reads the matching ``istfx train`` flags (``--optimizer``,
``--lr``, ``--weight-decay``, ``--betas``, ``--warmup-steps``,
``--lr-schedule``, ``--clip-grad-norm``, ``--optimizer-state``,
``--outer-lr``, ``--outer-momentum``; defined, torch-free, in
:func:`istfx.cli.options.add_optimizer_options`).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from istfx.errors import ISTError
from istfx.runtime.optim_state import MODES, check_mode
from istfx.runtime.outer import OuterStep

__all__ = ["OPTIMIZERS", "SCHEDULES", "StepControl", "TrainingRecipe", "from_args", "lr_factor"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int = 0, schedule: str = "constant", total_steps: int | None = None,
              min_factor: float = 0.0) -> float:
    """The learning-rate multiplier before optimizer step `step` (counted from 0 over the whole run).

    Linear warm-up from ``1/warmup_steps`` to 1 over `warmup_steps` steps,
    then constant, or a cosine decay from 1 to `min_factor` at `total_steps`.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ISTError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if not total_steps:
        raise ISTError("the cosine schedule needs the run's total optimizer steps (total_steps).")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainingRecipe:
    """Inner optimizer, schedule, clipping, optimizer-state mode and outer step of an IST run.

    Attributes:
        optimizer: ``"sgd"`` (with `momentum`) or ``"adamw"`` (with `betas`).
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD's L2 or AdamW's decoupled weight decay.
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        warmup_steps: linear warm-up, in optimizer steps per worker.
        lr_schedule: ``"constant"`` or ``"cosine"`` (to 0 at the run's last step).
        clip_grad_norm: clip each step's gradient to this L2 norm (None: off);
            under IST the norm is the subnet's gradient's.
        optimizer_state: ``"reset"`` (a fresh optimizer each round) or
            ``"carry"`` (state travels with its units).
        outer_lr, outer_momentum: the outer Nesterov step on the write-back
            (1 and 0: the plain write-back).
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    clip_grad_norm: float | None = None
    optimizer_state: str = "reset"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.optimizer = str(self.optimizer).strip().lower()
        if self.optimizer not in OPTIMIZERS:
            raise ISTError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.lr_schedule not in SCHEDULES:
            raise ISTError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}.")
        for label, value in (("lr", self.lr), ("weight_decay", self.weight_decay), ("momentum", self.momentum)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ISTError(f"{label} must be a finite number >= 0, got {value!r}.")
        if self.lr <= 0:
            raise ISTError(f"lr must be > 0, got {self.lr!r}.")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ISTError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        self.betas = betas  # type: ignore[assignment]
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ISTError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}.")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0):
            raise ISTError(f"clip_grad_norm must be > 0 (or None: off), got {self.clip_grad_norm!r}.")
        self.optimizer_state = check_mode(self.optimizer_state)
        self.outer = OuterStep(self.outer_lr, self.outer_momentum)

    # -- the pieces fit takes -------------------------------------------------------------------
    def build(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """The inner optimizer over `params` at the peak learning rate."""
        params = list(params)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def schedule(self, total_steps: int | None) -> Callable[[int], float] | None:
        """``step -> lr multiplier`` over a run of `total_steps` steps, or None when the lr is constant."""
        if not self.warmup_steps and self.lr_schedule == "constant":
            return None
        if self.lr_schedule == "cosine" and not total_steps:
            raise ISTError("the cosine schedule needs the run's total steps (rounds x local steps).")

        def factor(step: int) -> float:
            return lr_factor(step, self.warmup_steps, self.lr_schedule, total_steps)

        return factor

    def fit_kwargs(self, total_steps: int | None) -> dict[str, Any]:
        """Keyword arguments for :func:`istfx.fit` (``optimizer``, ``lr_schedule``, ``clip_grad_norm``,
        ``optimizer_state``, ``outer_lr``, ``outer_momentum``)."""
        return {"optimizer": self.build, "lr_schedule": self.schedule(total_steps),
                "clip_grad_norm": self.clip_grad_norm, "optimizer_state": self.optimizer_state,
                "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum}

    def describe(self) -> str:
        """One line, e.g. ``AdamW lr 0.003 betas (0.9, 0.99) wd 0.1, cosine, warm-up 100, clip 1, carry``."""
        if self.optimizer == "sgd":
            text = f"SGD lr {self.lr:g} momentum {self.momentum:g}"
        else:
            text = f"AdamW lr {self.lr:g} betas ({self.betas[0]:g}, {self.betas[1]:g})"
        if self.weight_decay:
            text += f" wd {self.weight_decay:g}"
        text += f", {self.lr_schedule}"
        if self.warmup_steps:
            text += f", warm-up {self.warmup_steps}"
        if self.clip_grad_norm:
            text += f", clip {self.clip_grad_norm:g}"
        text += f", optimizer state {self.optimizer_state}"
        if not self.outer.identity:
            text += f", outer Nesterov lr {self.outer_lr:g} momentum {self.outer_momentum:g}"
        return text

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra", None)
        return out


# -- command line -----------------------------------------------------------------------------------
def from_args(args: argparse.Namespace) -> TrainingRecipe:
    """The recipe the optimizer flags of ``istfx train`` describe (an :class:`ISTError` on bad values)."""
    return TrainingRecipe(optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, betas=tuple(args.betas), warmup_steps=args.warmup_steps,
                          lr_schedule=args.lr_schedule, clip_grad_norm=args.clip_grad_norm,
                          optimizer_state=args.optimizer_state, outer_lr=args.outer_lr,
                          outer_momentum=args.outer_momentum)



# -- around each optimizer step ------------------------------------------------------------------------
class StepControl:
    """The learning-rate schedule and gradient clipping, applied before each optimizer step.

    Args:
        schedule: ``step -> lr multiplier`` (counted over the whole run, per
            worker), or None for a constant learning rate.
        clip_grad_norm: clip the gradient of the optimizer's parameters to
            this L2 norm before each step, or None.

    :meth:`wrap` puts it around any stepper (``forward``/``backward``/``step``/...),
    so every backend's way of stepping gets the same schedule and clipping.
    """

    def __init__(self, schedule: Callable[[int], float] | None = None, clip_grad_norm: float | None = None) -> None:
        self.schedule, self.clip_grad_norm = schedule, clip_grad_norm

    @property
    def active(self) -> bool:
        return self.schedule is not None or self.clip_grad_norm is not None

    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's lr for global step `step` (from the lr it was built with); clip the gradients."""
        if self.schedule is not None:
            factor = self.schedule(step)
            for group in optimizer.param_groups:
                base = group.setdefault("istfx_peak_lr", group["lr"])
                group["lr"] = base * factor
        if self.clip_grad_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if not params and any(p.requires_grad for group in optimizer.param_groups for p in group["params"]):
                raise ISTError("clip_grad_norm: no parameter holds its gradient at the optimizer step (an engine "
                               "keeping gradients in partitions, such as DeepSpeed ZeRO 1 or 2?): use ZeRO 0, "
                               "or the engine's own clipping.")
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)

    def wrap(self, stepper: Any, optimizer: torch.optim.Optimizer, first_step: int) -> Any:
        """`stepper` with :meth:`before_step` before each of its steps, counting from `first_step`."""
        if not self.active:
            return stepper
        return _ControlledStepper(stepper, optimizer, self, first_step)


class _ControlledStepper:
    """A stepper whose optimizer steps are preceded by a :class:`StepControl`; everything else is passed through.

    A stepper that steps its optimizer somewhere other than in ``step()``
    (an engine stepping at its accumulation boundary inside ``backward``)
    declares a ``before_step`` attribute; it is set to a callback it must call
    right before each optimizer step. Otherwise the control runs in ``step()``.
    """

    def __init__(self, inner: Any, optimizer: torch.optim.Optimizer, control: StepControl, first_step: int) -> None:
        self.inner, self.optimizer, self.control, self.next_step = inner, optimizer, control, first_step
        self.hooked = hasattr(inner, "before_step")
        if self.hooked:
            inner.before_step = self._before

    def _before(self) -> None:
        self.control.before_step(self.optimizer, self.next_step)
        self.next_step += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self) -> None:
        if not self.hooked:
            self._before()
        self.inner.step()
