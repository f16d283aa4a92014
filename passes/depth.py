"""The depth pass: residual blocks found on the captured graph (ResIST).

A residual block is an ``add`` whose one operand is a tensor ``x`` carried
unchanged (the identity skip) and whose other operand is a *branch*
computed from ``x``. The branch is every node on a path from ``x`` to that
operand. It can be dropped from a subnet when none of its nodes is used
outside it: the add then becomes ``x`` and the branch, with its parameters,
disappears from the subnet's graph. Adds whose operands are both computed
from a common input (a strided or projection shortcut) are reported as
blocks that are never dropped: they are shared and averaged.

Blocks are named by the module that holds their branch (the longest module
path common to the branch's nodes). Branches with the same module path form
one droppable unit, so a transformer layer's attention and MLP branches are
dropped together.

Usage::

    blocks = find_residual_blocks(captured.module)
    for b in blocks: print(b.module, b.droppable, b.parameters)
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.fx as fx

_ADDS = {torch.ops.aten.add.Tensor}
# Ops a branch output may pass through after its last parametric op and still be scaled by
# scaling that op's parameters (they commute with a positive scalar).
_COMMUTING = {"dropout", "native_dropout", "clone", "contiguous", "view", "reshape", "_unsafe_view",
              "transpose", "permute", "to", "_to_copy", "alias", "expand", "squeeze", "unsqueeze", "flatten"}


@dataclass
class Branch:
    """One residual add: ``add(skip, branch_out)`` with the branch's nodes."""

    add: str  # name of the add node
    skip: str  # name of the node carried unchanged
    output: str  # name of the branch's last node (the add's other operand)
    nodes: list[str]  # branch nodes in graph order
    parameters: list[str]  # parameters/buffers only the branch reads
    module: str
    self_contained: bool  # no branch node is used outside the branch


@dataclass
class Block:
    """A droppable unit: every branch with one module path."""

    module: str
    branches: list[Branch] = field(default_factory=list)
    droppable: bool = True
    reason: str = ""
    shortcut: bool = False  # a strided/projection block: dropping it keeps only its shortcut path

    @property
    def parameters(self) -> list[str]:
        """Parameters and buffers only this block's branches read."""
        return sorted({p for b in self.branches for p in b.parameters})


def find_residual_blocks(gm: fx.GraphModule) -> tuple[list[Block], list[Block]]:
    """(identity-skip blocks, blocks with a non-identity shortcut), in graph order."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    ancestors: dict[fx.Node, int] = {}
    for n in nodes:
        bits = 1 << order[n]
        for inp in n.all_input_nodes:
            bits |= ancestors[inp]
        ancestors[n] = bits
    users_of: dict[fx.Node, set[fx.Node]] = {n: set(n.users) for n in nodes}
    by_name = {n.name: n for n in nodes}
    identity: dict[str, Block] = {}
    shortcut: dict[str, Block] = {}
    for n in nodes:
        if n.op != "call_function" or n.target not in _ADDS or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and _same_shape(a, b)):
            continue
        for skip, out in ((a, b), (b, a)):
            if ancestors[out] >> order[skip] & 1 and not _is_state(skip):
                branch = _branch(nodes, order, ancestors, users_of, skip, out, n)
                if branch.parameters:
                    identity.setdefault(branch.module, Block(branch.module)).branches.append(branch)
                break
        else:
            common = ancestors[a] & ancestors[b]
            if common and _has_params(a, ancestors, nodes) and _has_params(b, ancestors, nodes):
                fork = nodes[common.bit_length() - 1]  # the latest node both operands are computed from
                side = [_branch(nodes, order, ancestors, users_of, fork, out, n) for out in (a, b)]
                shorter, longer = sorted(side, key=lambda br: len(br.nodes))
                branch = longer
                branch.skip = shorter.output  # dropping keeps the shortcut path
                branch.nodes = [m for m in branch.nodes if m not in set(shorter.nodes)]
                module = _module_path([by_name[m] for m in branch.nodes]) or _module_path([n])
                block = shortcut.setdefault(module, Block(module, droppable=False, shortcut=True,
                                                          reason="shortcut is not the identity (stride or projection)"))
                block.branches.append(branch)
    blocks = list(identity.values())
    for block in blocks:
        if not all(b.self_contained for b in block.branches):
            block.droppable, block.reason = False, "a branch value is used outside the block"
    return blocks, list(shortcut.values())


def group_blocks(blocks: list[Block], pattern: str) -> list[Block]:
    """Merge blocks into one unit per module matching `pattern` (e.g. ``"layers.*"``).

    Each block joins the shortest prefix of its module path that matches the
    glob, so a layer whose attention and MLP branches were named after
    different submodules becomes one droppable unit.
    """
    merged: dict[str, Block] = {}
    for block in blocks:
        parts = block.module.split(".")
        key = next((".".join(parts[:k]) for k in range(1, len(parts) + 1)
                    if fnmatch.fnmatchcase(".".join(parts[:k]), pattern)), block.module)
        unit = merged.setdefault(key, Block(key, droppable=True, shortcut=block.shortcut))
        unit.branches.extend(block.branches)
        if not block.droppable:
            unit.droppable, unit.reason = False, block.reason
    return list(merged.values())


def select_blocks(blocks: list[Block], pattern: str, shortcuts: list[Block] = ()) -> list[Block]:
    """Droppable blocks whose module path matches a glob (``"*"``, ``"layer3.*"``).

    Blocks in `shortcuts` (strided/projection blocks) are selected too: the
    naive ResIST decomposition deals them out, keeping their shortcut path.
    """
    pool = [b for b in blocks if b.droppable] + [b for b in shortcuts if b.branches]
    order = {id(b): i for i, b in enumerate(blocks + list(shortcuts))}
    return sorted((b for b in pool if fnmatch.fnmatchcase(b.module, pattern)), key=lambda b: order[id(b)])


def _branch(nodes, order, ancestors, users_of, skip: fx.Node, out: fx.Node, add: fx.Node) -> Branch:
    lo, hi = order[skip], order[out]
    members = [m for m in nodes[lo + 1: hi + 1] if ancestors[m] >> lo & 1 and ancestors[out] >> order[m] & 1]
    member_set = set(members)
    # Checks that only read branch values (export's metadata asserts) go with the branch.
    for m in list(members):
        for u in users_of[m]:
            if u not in member_set and not u.users and u.op == "call_function" and u is not add:
                members.append(u)
                member_set.add(u)
    # In-place updates of state of the branch's own modules (batch norm's step counter) go too.
    owned = {inp.target.rsplit(".", 1)[0] for m in members for inp in m.all_input_nodes
             if inp.op == "get_attr" and users_of[inp] <= member_set}
    for state in nodes:
        if state.op == "get_attr" and state.target.rsplit(".", 1)[0] in owned:
            updates = users_of[state]
            if updates and all(u.op == "call_function" and not u.users for u in updates):
                for u in updates - member_set:
                    members.append(u)
                    member_set.add(u)
    members.sort(key=order.__getitem__)
    self_contained = all(users_of[m] <= member_set | ({add} if m is out else set()) for m in members)
    params = []
    for m in members:
        for inp in m.all_input_nodes:
            if inp.op == "get_attr" and users_of[inp] <= member_set and inp.target not in params:
                params.append(inp.target)
    return Branch(add.name, skip.name, out.name, [m.name for m in members], params,
                  _module_path(members), self_contained)


def _module_path(members: list[fx.Node]) -> str:
    """The longest module path that holds every node of a branch."""
    paths = []
    for m in members:
        stack = m.meta.get("nn_module_stack")
        if stack:
            paths.append(_fqn(list(stack.values())[-1][0]).split("."))
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def _fqn(path: str) -> str:
    # export records module paths as e.g. "L['self'].layer1[0]" or "layer1.0"
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "").replace("'", "")


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def _is_state(n: fx.Node) -> bool:
    return n.op == "get_attr"


def _has_params(n: fx.Node, ancestors, nodes) -> bool:
    bits = ancestors[n]
    return any(m.op == "get_attr" and bits >> i & 1 for i, m in enumerate(nodes))


def deal_blocks(n_blocks: int, subnets: int, min_depth: int | None, rng) -> list[list[int]]:
    """Blocks each subnet keeps this round: a random partition, topped up to `min_depth`.

    Without `min_depth` every block is in exactly one subnet (shares differ by
    at most one). With it, a subnet holding fewer than `min_depth` blocks
    borrows random others, so blocks overlap and are averaged on reassembly.
    """
    perm = [int(i) for i in rng.permutation(n_blocks)]
    base, extra = divmod(n_blocks, subnets)
    held, start = [], 0
    for s in range(subnets):
        size = base + (1 if s < extra else 0)
        held.append(sorted(perm[start:start + size]))
        start += size
    if min_depth:
        for s in range(subnets):
            others = [b for b in (int(i) for i in rng.permutation(n_blocks)) if b not in held[s]]
            held[s] = sorted(held[s] + others[: max(0, min_depth - len(held[s]))])
    return held


def keep_probability(n_blocks: int, subnets: int, min_depth: int | None) -> float:
    """The fraction of subnets that hold a block in a round, on average (ResIST's p)."""
    base = n_blocks / subnets
    per_subnet = max(base, min_depth or 0) if min_depth else base
    return min(1.0, per_subnet / n_blocks) if n_blocks else 1.0


_FOLDABLE = {
    "linear": ("weight", "bias"), "conv1d": ("weight", "bias"), "conv2d": ("weight", "bias"),
    "conv3d": ("weight", "bias"), "convolution": ("weight", "bias"), "addmm": ("self", "mat2"),
    "batch_norm": ("weight", "bias"), "layer_norm": ("weight", "bias"), "rms_norm": ("weight",),
}


def fold_targets(gm: fx.GraphModule, branch: Branch) -> list[str] | None:
    """Parameters whose scaling by p scales the branch output by p (None if there are none).

    Walks back from the branch output through ops that commute with a positive
    scalar (dropout, views, casts) to the last op that is linear in its weight
    and bias (linear, conv, addmm, affine norms).
    """
    from istfx.core.rules import bind

    by_name = {n.name: n for n in gm.graph.nodes}
    node = by_name[branch.output]
    while node.op == "call_function":
        name = getattr(node.target, "_opname", "")
        if name in _FOLDABLE:
            bound = bind(node)
            targets = []
            for arg in _FOLDABLE[name]:
                value = bound.get(arg)
                if isinstance(value, fx.Node):
                    if value.op != "get_attr":
                        return None
                    targets.append(value.target)
            return targets or None
        if name in _COMMUTING and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        return None
    return None
