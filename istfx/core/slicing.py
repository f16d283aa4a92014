"""Which slice of every parameter and buffer each subnet holds in a round.

:class:`RoundSlices` turns a plan's unit assignment into per-tensor,
per-dimension index tensors (None where a dimension is not cut), and applies
them both ways: :meth:`take` cuts a full-size tensor down to a subnet's
slice, :meth:`put` writes slices back. Parameters, their optimizer state and
buffers all go through the same two functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from istfx.core.analysis import AnalysisResult
from istfx.core.plan import Plan

Index = list[torch.Tensor | None]  # one entry per dimension


def leaf_to_group(plan: Plan, analysis: AnalysisResult) -> dict[int, int]:
    """Root atom of each split group's leaf -> group id."""
    return {analysis.alg.find(plan.groups[gid].atom): gid for gid in plan.split}


@dataclass
class RoundSlices:
    """Per-subnet indices of every state tensor for one round's assignment."""

    indices: list[dict[str, Index]]  # subnet -> tensor name -> per-dim index
    disjoint: bool

    @classmethod
    def build(cls, plan: Plan, analysis: AnalysisResult, assignment: dict[int, list[torch.Tensor]]) -> "RoundSlices":
        """Indices of every state tensor for every subnet under `assignment`."""
        alg = analysis.alg
        groups_by_leaf = leaf_to_group(plan, analysis)
        per_subnet = []
        for s in range(plan.subnets):
            def selected(leaf: int, s: int = s) -> torch.Tensor | None:
                gid = groups_by_leaf.get(alg.find(leaf))
                return None if gid is None else assignment[gid][s]

            per_subnet.append({
                name: [alg.indices(atom, selected) for atom in tensor.axes]
                for name, tensor in analysis.state.items()
            })
        return cls(per_subnet, plan.policy.disjoint)

    def is_cut(self, name: str) -> bool:
        """True when some dimension of tensor `name` is cut."""
        return any(i is not None for i in self.indices[0][name])

    def held_shape(self, name: str, shape: Sequence[int], subnet: int) -> tuple[int, ...]:
        """Shape of subnet `subnet`'s slice of tensor `name`, whose full shape is `shape`."""
        return tuple(size if i is None else len(i) for size, i in zip(shape, self.indices[subnet][name]))

    def take(self, name: str, full: torch.Tensor, subnet: int) -> torch.Tensor:
        """A new tensor holding subnet `subnet`'s slice of `full` (never a view)."""
        out = full
        for dim, index in enumerate(self.indices[subnet][name]):
            if index is not None:
                out = out.index_select(dim, index.to(full.device))
        return out.clone() if out is full else out

    def put(self, name: str, full: torch.Tensor, parts: Sequence[tuple[int, torch.Tensor, float]]) -> None:
        """Write subnets' slices back into `full` in place.

        `parts` holds (subnet, slice, weight). Elements held by one subnet are
        copied exactly; elements held by several are averaged as
        ``full + sum w (x - full) / sum w``, which leaves `full` bit-for-bit
        unchanged when every slice equals it. Integer tensors (counters) take
        the maximum.
        """
        if not parts:
            return
        if not self.is_cut(name):
            _average_whole(full, parts)
            return
        if self.disjoint:
            for subnet, value, _ in parts:
                _scatter(full, self.indices[subnet][name], value)
            return
        holders = torch.zeros(full.shape, dtype=torch.float64, device=full.device)
        for subnet, value, weight in parts:
            _scatter_add(holders, self.indices[subnet][name], torch.full(value.shape, 1.0, dtype=torch.float64))
        single = holders == 1
        if not full.is_floating_point():
            for subnet, value, _ in parts:
                _scatter(full, self.indices[subnet][name], value)
            return
        delta = torch.zeros(full.shape, dtype=torch.float64, device=full.device)
        weights = torch.zeros(full.shape, dtype=torch.float64, device=full.device)
        exact = full.clone()
        for subnet, value, weight in parts:
            index = self.indices[subnet][name]
            current = _gather(full, index)
            _scatter_add(delta, index, weight * (value.double() - current.double()))
            _scatter_add(weights, index, torch.full(value.shape, float(weight), dtype=torch.float64))
            _scatter(exact, index, value)
        held = weights > 0
        averaged = full.double() + torch.where(held, delta / weights.clamp_min(1e-300), torch.zeros_like(delta))
        full.copy_(torch.where(single, exact, averaged.to(full.dtype)))


def _average_whole(full: torch.Tensor, parts: Sequence[tuple[int, torch.Tensor, float]]) -> None:
    if len(parts) == 1:
        full.copy_(parts[0][1])
        return
    if not full.is_floating_point():
        full.copy_(torch.stack([v for _, v, _ in parts]).amax(0))
        return
    total = float(sum(w for _, _, w in parts))
    delta = sum(w * (v.double() - full.double()) for _, v, w in parts)
    full.copy_((full.double() + delta / total).to(full.dtype))


def _open_index(index: Index, shape: Sequence[int]) -> tuple:
    """Broadcastable advanced index for a per-dimension index list."""
    rank = len(index)
    out = []
    for dim, (i, size) in enumerate(zip(index, shape)):
        i = torch.arange(size) if i is None else i
        view = [1] * rank
        view[dim] = -1
        out.append(i.view(view))
    return tuple(out)


def _scatter(full: torch.Tensor, index: Index, value: torch.Tensor) -> None:
    if all(i is None for i in index):
        full.copy_(value)
    elif sum(i is not None for i in index) == 1:
        dim = next(d for d, i in enumerate(index) if i is not None)
        full.index_copy_(dim, index[dim].to(full.device), value.to(full.dtype))
    else:
        full[_open_index(index, full.shape)] = value.to(full.dtype)


def _scatter_add(full: torch.Tensor, index: Index, value: torch.Tensor) -> None:
    if all(i is None for i in index):
        full.add_(value)
    else:
        full.index_put_(_open_index(index, full.shape), value.to(full.dtype), accumulate=True)


def _gather(full: torch.Tensor, index: Index) -> torch.Tensor:
    out = full
    for dim, i in enumerate(index):
        if i is not None:
            out = out.index_select(dim, i)
    return out
