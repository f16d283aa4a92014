"""Coupled-axis groups: the units a plan can cut, with where they live.

A group is a leaf class of the axis algebra that some parameter or buffer
touches. Its *members* say where: which tensor, which dimension, and, inside
fused or viewed axes, the offset of the segment and the number of elements
one unit spans (a whole head of 64 is one unit of a heads group).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from istfx.core.analysis import AnalysisResult
from istfx.core.axes import CONCAT, NOT_UNITS, PRODUCT

EXACT, APPROXIMATE, FROZEN = "exact", "approximate", "frozen"


@dataclass(frozen=True)
class Member:
    """One place a group's units live: ``tensor[dim]``, a segment and a stride inside it."""

    tensor: str
    dim: int
    offset: int  # start of the segment inside the dimension (fused tensors)
    length: int  # elements of the segment
    unit: int  # contiguous elements per unit (e.g. head_dim for a heads group)
    inner: bool  # a minor factor of a viewed axis (e.g. head_dim inside heads x head_dim)
    dim_size: int  # full size of the dimension

    def __str__(self) -> str:
        text = f"{self.tensor}[{self.dim}]"
        if self.offset or self.length != self.dim_size:
            text += f"[{self.offset}:{self.offset + self.length}]"
        if self.unit > 1:
            text += f" (unit={self.unit})"
        return text


@dataclass
class Group:
    """A set of axes that must be cut together, and whether cutting them is safe."""

    id: int
    atom: int
    units: int
    members: list[Member] = field(default_factory=list)
    status: str = EXACT
    reasons: list[str] = field(default_factory=list)
    constants_only: bool = False  # every member is a constant the graph computes: no parameter or buffer

    @property
    def inner(self) -> bool:
        """True when the group is a minor factor of a viewed axis (a head_dim-like axis)."""
        return any(m.inner for m in self.members)

    @property
    def tensors(self) -> list[str]:
        """Names of the tensors the group lives on."""
        return sorted({m.tensor for m in self.members})

    def describe(self) -> str:
        """One line: id, status, units and the first members."""
        shown = ", ".join(str(m) for m in self.members[:4])
        more = f", +{len(self.members) - 4} more" if len(self.members) > 4 else ""
        return f"g{self.id} [{self.status}] {self.units} units: {shown}{more}"


def build_groups(result: AnalysisResult) -> list[Group]:
    """Groups of every leaf axis that a parameter or buffer touches, in first-seen order."""
    alg = result.alg
    groups: dict[int, Group] = {}
    for tensor in result.state.values():
        for dim, atom in enumerate(tensor.axes):
            for leaf, offset, length, unit, inner in _walk(alg, atom, 0, alg.size(atom), 1, False):
                group = groups.get(leaf)
                if group is None:
                    group = groups[leaf] = Group(id=len(groups), atom=leaf, units=alg.size(leaf))
                member = Member(tensor.name, dim, offset, length, unit, inner, tensor.shape[dim])
                if member not in group.members:
                    group.members.append(member)
    for group in groups.values():
        group.constants_only = all(result.state[m.tensor].kind == "constant" for m in group.members)
        flags = alg.flags(group.atom)
        if flags.frozen:
            group.status, group.reasons = FROZEN, list(flags.frozen)
        elif flags.approximate:
            group.status, group.reasons = APPROXIMATE, list(flags.approximate)
    return list(groups.values())


def _walk(alg, atom: int, offset: int, length: int, unit: int, inner: bool):
    """Yield (leaf, segment offset, segment length, unit elements, inner) under an atom."""
    ref = alg.refinement(atom)
    if ref is None:
        yield alg.find(atom), offset, length, unit, inner
        return
    sizes = [alg.size(c) for c in ref.children]
    if ref.kind == CONCAT:
        start = offset
        for child, size in zip(ref.children, sizes):
            yield from _walk(alg, child, start, size * unit, unit, inner)
            start += size * unit
    else:
        assert ref.kind == PRODUCT
        stride = unit
        strides = []
        for size in reversed(sizes):
            strides.append(stride)
            stride *= size
        strides.reverse()
        seen_major = False
        for child, size, child_unit in zip(ref.children, sizes, strides):
            yield from _walk(alg, child, offset, length, child_unit, inner or seen_major)
            # A major factor that is no set of units (the q/k/v selector of a packed projection, a batch
            # folded with heads) does not make the factors after it minor.
            seen_major = seen_major or (size > 1 and not _not_units(alg, child))


def _not_units(alg, atom: int) -> bool:
    return any(r.startswith(NOT_UNITS) for r in alg.flags(atom).frozen)
