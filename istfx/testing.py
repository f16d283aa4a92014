"""Helpers for checking the IST invariants (used by the test suite, usable by anyone).

Mask equivalence: a subnet of an exact split equals the full model with the
parameters of the units it does not hold set to zero.
"""
from __future__ import annotations

import torch

from istfx.core.compiler import ISTModel
from istfx.core.slicing import RoundSlices, _scatter


def held_mask(slices: RoundSlices, name: str, shape: torch.Size, subnet: int) -> torch.Tensor:
    """1 where subnet `subnet` holds an element of tensor `name`, 0 elsewhere."""
    mask = torch.zeros(shape)
    _scatter(mask, slices.indices[subnet][name], torch.ones(slices.held_shape(name, shape, subnet)))
    return mask


def masked_state(ist: ISTModel, slices: RoundSlices, subnet: int) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers with every unit `subnet` does not hold zeroed."""
    out = {}
    for name in ist.trainable_state:
        full = ist.state_tensor(name).detach().clone()
        if slices.is_cut(name):
            full = full * held_mask(slices, name, full.shape, subnet).to(full.dtype)
        out[name] = full
    return out
