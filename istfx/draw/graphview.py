"""A picture of a compiled model's captured graph, coloured by split group.

Every placeholder, ``get_attr`` and ``call_function`` node of the captured
``GraphModule`` becomes a box; edges follow the data. A box takes the colour of
the split group that its output is cut along: the last output axis whose leaf
classes include a split group's leaf decides (for ``linear`` that is the
feature axis, for a conv the channel axis comes before the spatial axes, which
are never split). Nodes whose output no split group cuts are grey.

Usage::

    ist = istfx.compile(model, subnets=4)
    svg = plan_graph_svg(ist)
    Path("plan.svg").write_text(svg)

``istfx inspect MODEL.py --graph plan.svg`` does the same from the shell.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from istfx.draw.svg import SvgNode, render_graph_svg

if TYPE_CHECKING:
    from istfx.core.compiler import ISTModel

__all__ = ["node_split_groups", "plan_graph_svg"]

_DRAWN_OPS = ("placeholder", "get_attr", "call_function")
_LEGEND_CHARS = 60


def node_split_groups(ist: ISTModel) -> dict[str, int | None]:
    """Top-level node name -> id of the split group its output is cut along (or None).

    Only nodes that :func:`plan_graph_svg` draws are listed. For a node with
    several tensor outputs the first output cut by a split group decides.
    """
    alg = ist.analysis.alg
    by_root = {alg.find(ist.plan.groups[gid].atom): gid for gid in ist.plan.split}
    out: dict[str, int | None] = {}
    for node in ist.captured.module.graph.nodes:
        if node.op not in _DRAWN_OPS:
            continue
        axes = ist.analysis.node_axes.get(("", node.name))
        out[node.name] = _group_of(axes, alg, by_root)
    return out


def _group_of(axes: Any, alg, by_root: dict[int, int]) -> int | None:
    """Split group of the last axis of `axes` that one cuts; recurses into tuple outputs."""
    if not isinstance(axes, (list, tuple)) or not axes:
        return None
    if all(isinstance(a, int) for a in axes):  # one tensor: an atom per axis
        for atom in reversed(axes):
            for leaf in alg.leaves(atom):
                gid = by_root.get(alg.find(leaf))
                if gid is not None:
                    return gid
        return None
    for item in axes:  # several outputs: the first one that a split group cuts
        gid = _group_of(item, alg, by_root)
        if gid is not None:
            return gid
    return None


def plan_graph_svg(ist: ISTModel, title: str | None = None) -> str:
    """Render the captured graph of `ist` as an SVG document, one colour per split group.

    Args:
        ist: a compiled model (:func:`istfx.compile`).
        title: heading of the picture; by default the model class, the number
            of subnets and the number of split groups.

    Returns:
        A standalone SVG string (open it in a browser; hover a box for the op,
        its output shape, its group and the model source line).
    """
    plan = ist.plan
    graph = ist.captured.module.graph
    groups = node_split_groups(ist)

    nodes: list[SvgNode] = []
    drawn: set[str] = set()
    for node in graph.nodes:
        if node.op not in _DRAWN_OPS:
            continue
        gid = groups.get(node.name)
        key = None if gid is None else f"g{gid}"
        nodes.append(SvgNode(node.name, _label(node), key, _tooltip(node, key)))
        drawn.add(node.name)

    edges = [
        (src.name, node.name)
        for node in graph.nodes
        if node.name in drawn
        for src in node.all_input_nodes
        if src.name in drawn
    ]

    legend = {}
    for gid in plan.split:
        group = plan.groups[gid]
        places = list(dict.fromkeys(f"{m.tensor}[{m.dim}]" for m in group.members))
        text = f"split {group.units} units ({places[0]}, ...)" if len(places) > 1 else ""
        if not text or len(f"g{gid}: {text}") > _LEGEND_CHARS:  # the renderer cuts longer lines
            text = f"split {group.units} units ({places[0]})"
        legend[f"g{gid}"] = text

    if title is None:
        title = (f"{type(ist.model).__name__}: {plan.subnets} subnets, "
                 f"{len(plan.split)} split group{'s' if len(plan.split) != 1 else ''}")
    return render_graph_svg(nodes, edges, legend, title, compact_sources=True)


def _label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op == "get_attr":
        return str(node.target)
    return node.name


def _tooltip(node: fx.Node, key: str | None) -> str:
    lines = [f"{node.op} {node.name}"]
    if node.op == "call_function":
        lines.append(f"op: {_target_name(node.target)}")
    elif node.op == "get_attr":
        lines.append(f"tensor: {node.target}")
    shape = _shape(node.meta.get("val"))
    if shape:
        lines.append(f"output: {shape}")
    lines.append(f"split group: {key}" if key else "not split")
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            lines.append(f"module: {path}")
    from istfx.core.analysis import source_line

    source = source_line(node)
    if source:
        lines.append(f"source: {source}")
    return "\n".join(lines)


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def _shape(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (list, tuple)):
        parts = [_shape(v) for v in val]
        return "(" + ", ".join(p or "-" for p in parts) + ")" if any(parts) else ""
    return ""
