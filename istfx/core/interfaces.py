"""What the compiler asks of the passes handed to it, and the residual blocks a depth pass describes.

The compiler core decides nothing about *what* to cut: it calls passes given
to :func:`istfx.core.compiler.compile` (``istfx.compile`` hands it the
defaults from :mod:`istfx.passes`). A pass implements one of the protocols
here; the data it returns (groups to split, :class:`Block` s to deal out, role
labels) is all the core reads, so a new pass is one new class in
``passes/`` and never an import in the core.

- :class:`GroupSplitter` (the width pass): which coupled-axis groups to split.
- :class:`BlockFinder` (the depth pass): which residual blocks to deal out,
  as a :class:`DepthPlan`.
- :class:`GroupDescriber` (the heads pass's ``describe``): a role per group,
  shown by ``print(plan)`` and ``plan.to_dict()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    import torch.fx as fx

    from istfx.core.groups import Group


@dataclass
class Branch:
    """One residual add, ``add(skip, branch_out)``, and the nodes of its branch.

    Names are node names of the captured graph; a subnet that skips the block
    replaces the add by ``skip`` and erases ``nodes``.
    """

    add: str  # name of the add node
    skip: str  # name of the node carried unchanged
    output: str  # name of the branch's last node (the add's other operand)
    nodes: list[str]  # branch nodes in graph order
    parameters: list[str]  # parameters/buffers only the branch reads
    module: str
    self_contained: bool  # no branch node is used outside the branch
    source: str = ""  # the user's source line of the add, as 'file.py:12 `code`'


@dataclass
class Block:
    """A droppable unit: every branch with one module path."""

    module: str
    branches: list[Branch] = field(default_factory=list)
    droppable: bool = True
    reason: str = ""
    shortcut: bool = False  # a strided/projection block: dropping it keeps only its shortcut path

    @property
    def name(self) -> str:
        """The module path, or for a block in the model's own forward, ``<root>`` and where its add is."""
        if self.module:
            return self.module
        where = next((b.source for b in self.branches if b.source), "")
        return f"<root> ({where})" if where else "<root>"

    @property
    def parameters(self) -> list[str]:
        """Parameters and buffers only this block's branches read."""
        return sorted({p for b in self.branches for p in b.parameters})


@dataclass
class DepthPlan:
    """What a depth pass decided: blocks dealt out, blocks kept everywhere, and the evaluation-scale carriers.

    ``carriers`` are the parameters whose scaling by p scales the dealt-out
    branches by p (ResIST's evaluation scaling is folded into them);
    ``uncarried`` names each dealt-out block with no such parameter and why.
    """

    blocks: list[Block]
    shared: list[Block] = field(default_factory=list)
    carriers: list[str] = field(default_factory=list)
    uncarried: dict[str, str] = field(default_factory=dict)  # block name -> why nothing carries p


class GroupSplitter(Protocol):
    """The width pass: ``run(groups) -> (ids of the groups to split, {group id: why kept whole})``."""

    def run(self, groups: list[Group]) -> tuple[list[int], dict[int, str]]: ...


class BlockFinder(Protocol):
    """The depth pass: the residual blocks of the captured graph to deal out among subnets."""

    def run(self, module: fx.GraphModule) -> DepthPlan: ...


class RoleLabel(Protocol):
    """A group's role: a short name (``"heads"``) and a one-line account (``"4 heads"``)."""

    name: str
    detail: str


# The heads pass's ``describe``: an ISTModel (plan and analysis) -> a role per group id.
GroupDescriber = Callable[[Any], Mapping[int, RoleLabel]]

__all__ = ["Branch", "Block", "DepthPlan", "GroupSplitter", "BlockFinder", "RoleLabel", "GroupDescriber"]
