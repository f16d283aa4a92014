"""Where a rank keeps the model's tensors: dropping the full model to ``meta`` and giving it storage again.

Ranks that do not hold the full model (``ps`` workers, every ``sharded``
rank) keep ``ist.model``'s structure (shapes, dtypes, ties) without storage::

    release_model(ist)          # parameters and buffers become meta tensors
    materialize_model(ist)      # real, uninitialised storage again (before loading or gathering)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from istfx.core.compiler import ISTModel

__all__ = ["is_finite", "is_released", "materialize_model", "release_model", "state_of"]


def _replace_state(modules: list[nn.Module],
                   make: Callable[[torch.Tensor], torch.Tensor | None]) -> dict[int, torch.Tensor]:
    """Replace parameters and buffers of `modules` by ``make(old)`` (None: keep), preserving ties.

    Parameters stay parameters (same ``requires_grad``); a tensor reached
    under several names (tied weights, a module shared by two trees) is
    replaced once and shared again. Returns ``{id(old): new}``.
    """
    memo: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for key, old in list(table.items()):
                    if old is None:
                        continue
                    if id(old) not in memo:
                        value = make(old)
                        if value is None:
                            memo[id(old)] = old
                        elif isinstance(old, nn.Parameter):
                            memo[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad)
                        else:
                            memo[id(old)] = value
                    table[key] = memo[id(old)]
    return memo


def is_released(ist: ISTModel) -> bool:
    """Whether ``ist.model`` has tensors without storage (released, or built on ``meta``)."""
    return any(t.is_meta for t in [*ist.model.parameters(), *ist.model.buffers()])


def release_model(ist: ISTModel) -> None:
    """Drop the full-size parameters and buffers of ``ist.model`` (and the captured copy) to ``meta``.

    The modules keep their structure (shapes, dtypes, ties) without storage;
    :func:`materialize_model` gives them storage again.
    """
    def to_meta(t: torch.Tensor) -> torch.Tensor | None:
        return None if t.is_meta else torch.empty(t.shape, dtype=t.dtype, device="meta")

    memo = _replace_state([ist.model, ist.captured.module], to_meta)
    program_state = getattr(ist.captured.program, "state_dict", None)
    if isinstance(program_state, dict):
        for key, value in list(program_state.items()):
            if isinstance(value, torch.Tensor) and not value.is_meta:
                program_state[key] = memo.get(id(value), to_meta(value))


def materialize_model(ist: ISTModel, device: torch.device | str = "cpu") -> None:
    """Give a released (or meta-built) ``ist.model`` real, uninitialised storage on `device`."""
    def real(t: torch.Tensor) -> torch.Tensor | None:
        return torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_meta else None

    _replace_state([ist.model], real)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by name (tied tensors under each of their names)."""
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return state


def is_finite(tensor: torch.Tensor) -> bool:
    """False when a floating tensor holds NaN or Inf (one pass: its minimum and maximum)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))
