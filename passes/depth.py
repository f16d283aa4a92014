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

For ResIST's evaluation scaling each dealt-out branch needs a *carrier*:
parameters whose scaling by p scales the branch output by exactly p (the
last linear op's weight and bias, or LayerScale's gamma); see
:func:`find_carrier`.

Usage::

    plan = DepthPass(blocks="layer*").run(captured.module)   # a DepthPlan
    for b in plan.blocks: print(b.name, b.parameters)
    blocks, shortcuts = find_residual_blocks(captured.module)  # everything found
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from istfx.core.analysis import source_line
from istfx.core.interfaces import Block, Branch, DepthPlan
from istfx.core.plan import deal_blocks, keep_probability  # noqa: F401  (dealing lives in the plan)
from istfx.core.rules import bind
from istfx.errors import ISTError

# `out += identity` (torchvision's ResNet blocks) is captured as the in-place add.
_ADDS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
# Ops a branch output may pass through after its last parametric op and still be scaled by
# scaling that op's parameters (they commute with a positive scalar).
_COMMUTING = {"dropout", "native_dropout", "clone", "contiguous", "view", "reshape", "_unsafe_view",
              "transpose", "permute", "to", "_to_copy", "alias", "expand", "squeeze", "unsqueeze", "flatten"}


SHORTCUT_BLOCKS = ("share", "drop")


def check_shortcut_blocks(value: str) -> None:
    """Raise a clear error unless `value` is a valid ``shortcut_blocks`` option."""
    if value not in SHORTCUT_BLOCKS:
        raise ISTError(f"shortcut_blocks must be 'share' or 'drop', got {value!r}.")


@dataclass
class DepthPass:
    """Chooses the residual blocks dealt out among subnets (ResIST).

    Args:
        blocks: a module-name glob (``"*"``, ``"layer3.*"``) selecting the
            droppable blocks (those with an identity skip) to deal out.
        shortcut_blocks: ``"share"`` keeps strided/projection blocks in every
            subnet; ``"drop"`` deals them out too, keeping their shortcut path.
        group_blocks: a module glob whose matches are the droppable units
            (every branch inside one match is dropped together).
    """

    blocks: str = "*"
    shortcut_blocks: str = "share"
    group_blocks: str | None = None

    def __post_init__(self) -> None:
        check_shortcut_blocks(self.shortcut_blocks)

    def run(self, module: fx.GraphModule) -> DepthPlan:
        """The blocks to deal out, those kept in every subnet, and the carriers of the evaluation scale."""
        found, shortcuts = find_residual_blocks(module)
        if self.group_blocks is not None:
            found = group_blocks(found, self.group_blocks)
        droppable = [b for b in found if b.droppable]
        if not droppable:
            raise ISTError(
                "blocks= asks for depth, but the model has no residual block with an identity skip "
                "(an add of a tensor and a branch computed from it). Compile without blocks= for width only."
            )
        selected = select_blocks(found, self.blocks, shortcuts if self.shortcut_blocks == "drop" else [])
        if not selected:
            names = ", ".join(b.name for b in droppable[:12])
            raise ISTError(f"blocks={self.blocks!r} matches no droppable residual block; they are: {names}.")
        plan = DepthPlan(selected, [b for b in found + shortcuts if b not in selected])
        index = _GraphIndex.of(module)
        for block in selected:
            for branch in block.branches:
                targets, why = find_carrier(module, branch, index)
                if targets is None:
                    plan.uncarried.setdefault(block.name, why)
                else:
                    plan.carriers.extend(t for t in targets if t not in plan.carriers)
        return plan


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
        # add(a, b, alpha=c) is a + c*b: only `a` can be the identity skip then.
        orders = ((a, b), (b, a)) if n.kwargs.get("alpha", 1) == 1 else ((a, b),)
        for skip, out in orders:
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
    named = list(members)  # the block is named after these, not after the inputs pulled in below
    _pull_in_exclusive_inputs(nodes, order, users_of, members, member_set, hi)
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
                  _module_path(named), self_contained, source_line(add))


def _pull_in_exclusive_inputs(nodes, order, users_of, members: list, member_set: set, hi: int) -> None:
    """Add the nodes computed only for the branch (a drop-path mask drawn from the batch size).

    A node whose every user is in the branch, or is a dead end that reads
    only the branch and it (``noise.div_(keep)``), is the branch's too:
    a subnet that skips the block then draws no random mask for it, like the
    model without that branch. An in-place op joins only with the tensor it
    updates.
    """
    pulled: set = set()

    def taken(u: fx.Node) -> bool:
        return u in member_set or u in pulled

    for n in reversed(nodes[:hi]):
        if n in member_set or n.op != "call_function" or not any(taken(u) for u in users_of[n]):
            continue
        dead_ends = [u for u in users_of[n] if not taken(u)]
        if all(not users_of[u] and u.op == "call_function"
               and all(taken(i) or i is n or i in dead_ends for i in u.all_input_nodes) for u in dead_ends):
            pulled.add(n)
            pulled.update(dead_ends)
    for n in sorted(pulled, key=order.__getitem__):
        target = n.args[0] if n.args else None
        name = getattr(n.target, "_opname", "")
        if name.endswith("_") and isinstance(target, fx.Node) and target not in member_set | pulled:
            continue  # it updates a tensor the rest of the model reads
        members.append(n)
        member_set.add(n)


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


_FOLDABLE = {
    "linear": ("weight", "bias"), "conv1d": ("weight", "bias"), "conv2d": ("weight", "bias"),
    "conv3d": ("weight", "bias"), "convolution": ("weight", "bias"), "addmm": ("self", "mat2"),
    "batch_norm": ("weight", "bias"), "layer_norm": ("weight", "bias"), "rms_norm": ("weight",),
    "mm": ("mat2",), "matmul": ("other",),
}
# Ops between a parameter and the linear op reading it that keep scaling it (Falcon's ``weight.T``).
_PARAM_VIEWS = {"t", "numpy_T", "mT", "transpose", "permute", "view", "reshape", "_to_copy", "to", "expand", "unsqueeze", "squeeze",
                "alias", "contiguous", "clone"}
# Ops whose output scales by p when their first argument does, for any p > 0 (positively homogeneous).
_HOMOGENEOUS = _COMMUTING | {
    "relu", "leaky_relu", "neg", "mean", "sum", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "slice", "select", "narrow", "unflatten", "repeat", "roll",
    "flip", "feature_dropout", "pixel_shuffle", "pixel_unshuffle",
}
# Multi-output ops that are homogeneous in their first argument, and which outputs are (None: all).
_HOMOGENEOUS_PARTS = {"native_dropout": {0}, "max_pool2d_with_indices": {0}, "adaptive_max_pool2d": {0},
                      "adaptive_max_pool1d": {0}, "split": None,
                      "split_with_sizes": None, "chunk": None, "unbind": None}
# Ops that only read their first argument's shape, dtype and device (or overwrite its values).
_METADATA_ONLY = {"new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like", "ones_like",
                  "full_like", "rand_like", "randn_like", "randint_like", "sym_size", "sym_numel", "sym_stride",
                  "sym_storage_offset", "bernoulli_", "uniform_", "normal_", "fill_", "zero_", "exponential_",
                  "random_"}


def _op(node: fx.Node) -> str:
    """The op's name without overload and without the in-place underscore (``mul_`` -> ``mul``)."""
    name = getattr(node.target, "_opname", "")
    return name[:-1] if name.endswith("_") else name


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs whose values `node` reads: not the first argument of ``new_empty``, ``bernoulli_``, ``sym_size``..."""
    raw = getattr(node.target, "_opname", "")
    first = node.args[0] if node.args else None
    if isinstance(first, fx.Node) and (raw in _METADATA_ONLY or (
            raw == "bernoulli" and getattr(node.target, "_overloadname", "") == "p")):
        return _flat_nodes((node.args[1:], node.kwargs))
    return list(node.all_input_nodes)


def _flat_nodes(values: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return found


def fold_targets(gm: fx.GraphModule, branch: Branch) -> list[str] | None:
    """Parameters whose scaling by p scales the branch output by p (None if there are none)."""
    targets, _ = find_carrier(gm, branch)
    return targets


@dataclass
class _GraphIndex:
    """Look-ups a carrier search needs, built once per graph."""

    order: dict
    by_name: dict
    state: set  # names of parameters and buffers
    reads: dict  # state name -> how many nodes read it

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _GraphIndex:
        nodes = list(gm.graph.nodes)
        reads: dict[str, int] = {}
        for n in nodes:
            if n.op == "get_attr":
                reads[n.target] = reads.get(n.target, 0) + len(n.users)
        state = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
        return cls({n: i for i, n in enumerate(nodes)}, {n.name: n for n in nodes}, state, reads)


def find_carrier(gm: fx.GraphModule, branch: Branch, index: _GraphIndex | None = None
                 ) -> tuple[list[str] | None, str]:
    """(parameters that carry a scaling of the branch output, or None; why there are none).

    Walks back from the branch output through ops that are positively
    homogeneous in the walked operand: views, casts, dropout and drop-path
    masks, ReLU and pooling, multiplication or division by a constant or by a
    tensor computed without the carrier, and sums of such paths (GPT-NeoX's
    parallel ``attn(x) + mlp(x)``). Each path stops at a *carrier*: a pointwise
    multiply by a parameter (LayerScale's ``gamma * f(x)``) or an op linear in
    its weight and bias (linear, conv, addmm, affine norms; the weight may be
    a transposed or reshaped parameter). Scaling the carriers' parameters by p
    then scales the branch output by exactly p, provided no carrier's
    parameters are read elsewhere, no other factor of the output and no other
    carrier's input is computed from a carrier.
    """
    index = index or _GraphIndex.of(gm)
    order, by_name = index.order, index.by_name

    def param(value: Any, op: fx.Node) -> str | None:
        """The parameter `value` is, read by `op` alone (directly or through a transpose/reshape)."""
        while (isinstance(value, fx.Node) and value.op == "call_function" and _op(value) in _PARAM_VIEWS
               and list(value.users) == [op]):
            op, value = value, value.args[0]
        if (isinstance(value, fx.Node) and value.op == "get_attr" and value.target in index.state
                and index.reads[value.target] == 1 and list(value.users) == [op]):
            return value.target
        return None

    carriers: list[fx.Node] = []  # the ops whose parameters are scaled
    targets: list[str] = []
    side: list[Any] = []  # other factors of the output
    work, seen = [by_name[branch.output]], set()
    while work:
        node = work.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op != "call_function":
            return None, f"its branch output comes from {node.op} {node.name}"
        if node.target is operator.getitem:
            source, part = node.args
            parts = _HOMOGENEOUS_PARTS.get(_op(source), ()) if isinstance(source, fx.Node) else ()
            if parts is None or part in parts:
                work.append(source.args[0])
                continue
            return None, _stop(node)
        name = _op(node)
        tensors = [v for v in node.args if isinstance(v, fx.Node) and isinstance(v.meta.get("val"), torch.Tensor)]
        if name in _FOLDABLE:
            bound = bind(node)
            values = [bound.get(arg) for arg in _FOLDABLE[name]]
            found = [param(v, node) for v in values if v is not None]
            if not found or None in found:
                return None, (f"its branch ends in {name} ({_where(node)}) whose weights are not parameters "
                              "read by that op alone")
            carriers.append(node)
            targets.extend(found)
        elif name == "mul" and len(node.args) == 2:
            a, b = node.args
            gamma = next((g for g in (param(v, node) for v in (a, b)) if g is not None), None)
            if gamma is not None:  # LayerScale: gamma * f(x)
                carriers.append(node)
                targets.append(gamma)
                continue
            if not tensors:
                return None, _stop(node)
            # The operand on the branch's data path: the one computed from parameters, else the first.
            data = sorted(tensors, key=lambda v: not _reads_state(v))[0]
            side.append(b if data is a else a)
            work.append(data)
        elif name == "div" and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
            side.append(node.args[1])
            work.append(node.args[0])
        elif name == "add" and len(tensors) == 2 and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            work.extend(tensors)  # a sum of scaled paths is scaled
        elif (name in _HOMOGENEOUS and node.args and isinstance(node.args[0], fx.Node)
              and not any(isinstance(a.meta.get("val"), torch.Tensor) for a in _flat_nodes(node.args[1:]))):
            work.append(node.args[0])
        else:
            return None, _stop(node)
    for carrier in carriers:
        culprit = next((v for v in side if _depends(v, carrier, order)), None)
        culprit = culprit or next((c for c in carriers if c is not carrier and _depends(c, carrier, order)), None)
        if culprit is not None:
            return None, (f"a factor of its branch output is computed from {_op(carrier)} ({_where(carrier)}), "
                          "so scaling that op's parameters would not scale the output by p")
    return list(dict.fromkeys(targets)), ""


def _stop(node: fx.Node) -> str:
    return (f"its branch ends in {getattr(node.target, '__name__', node.target)} ({_where(node)}), which no "
            "parameter of the branch can scale exactly (the walk back from the output passes only views, "
            "dropout and drop-path masks, ReLU, pooling and constant factors)")


def _where(node: fx.Node) -> str:
    """'in module 0.fc1, file.py:12 `code`' (or the node's name)."""
    module, line = _module_path([node]), source_line(node)
    parts = ([f"in module {module}"] if module else []) + ([line] if line else [])
    return ", ".join(parts) or f"node {node.name}"


def _reads_state(node: fx.Node) -> bool:
    """Whether `node`'s value is computed from a parameter, buffer or constant."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return True
        stack.extend(_value_inputs(n))
    return False


def _depends(value: Any, source: fx.Node, order: dict) -> bool:
    """Whether `value` is computed from the values of `source` (shape and dtype reads do not count)."""
    if not isinstance(value, fx.Node):
        return False
    seen, stack = set(), [value]
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n in seen or order[n] < order[source]:
            continue
        seen.add(n)
        inputs = _value_inputs(n)
        stack.extend(inputs)
    return False


__all__ = ["DepthPass", "DepthPlan", "Block", "Branch", "find_residual_blocks", "group_blocks", "select_blocks",
           "find_carrier", "fold_targets", "check_shortcut_blocks", "deal_blocks", "keep_probability"]
