"""Dependency-free SVG rendering of a dataflow graph.

The layout is layered: a node's rank is the length of the longest path that
reaches it from a source, each rank is drawn as one centred row, and data
flows from top to bottom. Within a row, nodes are ordered by the mean position
of their predecessors in the rows above (one barycentre sweep), which removes
most edge crossings in the chain-like graphs produced by ``torch.export``.

Everything runs in ``O(N + E)`` apart from the sorting of each row, so graphs
with thousands of nodes render quickly. The output is a self-contained SVG
string: open it in a browser and hover a node to see its tooltip.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SvgNode", "render_graph_svg", "color_for_keys"]


@dataclass
class SvgNode:
    """One node of the graph to draw.

    Attributes:
        id: unique identifier, referenced by the edges.
        label: text shown in the box (truncated when long).
        color_key: category that picks the fill colour; ``None`` draws grey.
        tooltip: text shown on hover; the full label when empty.
    """

    id: str
    label: str
    color_key: str | None
    tooltip: str = ""


# Qualitative pastel palette (ColorBrewer Set3 without its grey, then Pastel1
# and Pastel2 hues not already present); dark text stays readable on each.
_PALETTE: tuple[str, ...] = (
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462",
    "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f", "#b3cde3",
    "#decbe4", "#fed9a6", "#e5d8bd", "#f4cae4", "#cbd5e8", "#e6f5c9",
)
_NONE_FILL = "#e3e3e3"
_STROKE = "#555555"
_TEXT = "#1a1a1a"
_EDGE = "#777777"

_FONT_SIZE = 12
_CHAR_WIDTH = 7.2  # monospace advance at _FONT_SIZE, in px
_MAX_LABEL_CHARS = 28
_MAX_LEGEND_CHARS = 60
_NODE_HEIGHT = 28
_NODE_MIN_WIDTH = 48
_PAD_X = 10  # text padding inside a box
_GAP_X = 16  # horizontal gap between boxes of a row
_GAP_Y = 44  # vertical gap between rows
_MARGIN = 20
_TITLE_HEIGHT = 28
_LEGEND_ROW = 20
_SWATCH = 12

# Characters that XML 1.0 forbids even when escaped.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _esc(text: str) -> str:
    """Escape ``text`` for use in XML character data and quoted attributes."""
    text = _INVALID_XML.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())  # one line: collapse newlines and runs of spaces
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _text_width(text: str) -> float:
    return len(text) * _CHAR_WIDTH


def color_for_keys(keys: Iterable[str]) -> dict[str, str]:
    """Assign a distinct fill colour to each distinct key, deterministically.

    Keys are coloured in sorted order: the first ones take the palette, the
    rest take light hues spaced by the golden angle. The same set of keys
    always gets the same colours, whatever order the nodes come in.
    """
    colors: dict[str, str] = {}
    used = {_NONE_FILL}
    hue = 0.0
    for i, key in enumerate(sorted(set(keys))):
        if i < len(_PALETTE):
            color = _PALETTE[i]
        else:
            while True:
                hue = (hue + 0.618033988749895) % 1.0
                r, g, b = colorsys.hls_to_rgb(hue, 0.8, 0.6)
                color = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
                if color not in used:
                    break
        used.add(color)
        colors[key] = color
    return colors


def _ranks(preds: list[list[int]], succs: list[list[int]]) -> list[int]:
    """Longest-path rank of each node (Kahn's algorithm, ``O(N + E)``).

    Nodes on a cycle never reach in-degree zero; they are placed, in input
    order, one rank below their deepest already-placed predecessor, and the
    remaining edges of the cycle are drawn pointing upwards.
    """
    n = len(preds)
    indeg = [len(p) for p in preds]
    rank = [0] * n
    placed = [False] * n
    stack = [i for i in range(n) if indeg[i] == 0]
    stack.reverse()
    done = 0
    cursor = 0  # next candidate when breaking a cycle
    while done < n:
        if not stack:
            while placed[cursor]:
                cursor += 1
            stack.append(cursor)
            indeg[cursor] = 0
        i = stack.pop()
        if placed[i]:
            continue
        placed[i] = True
        done += 1
        for j in succs[i]:
            if placed[j]:
                continue
            rank[j] = max(rank[j], rank[i] + 1)
            indeg[j] -= 1
            if indeg[j] == 0:
                stack.append(j)
    return rank


def render_graph_svg(
    nodes: list[SvgNode],
    edges: list[tuple[str, str]],
    legend: dict[str, str] | None = None,
    title: str = "",
    *,
    compact_sources: bool = False,
) -> str:
    """Render a directed graph as a standalone SVG document.

    Args:
        nodes: the nodes; ids must be unique.
        edges: ``(source_id, target_id)`` pairs; both ids must name nodes.
            Duplicate edges are drawn once and self-loops are not drawn.
        legend: description of each colour key, ``{color_key: text}``. The
            legend box lists these keys in the given order, then any other key
            used by a node. With no keys at all, no legend is drawn.
        title: heading drawn above the graph.
        compact_sources: if True, move every source node down to the row just
            above its first consumer instead of the top row. In an exported
            program, whose parameters and inputs are all sources, this puts
            each weight next to the operation that reads it.

    Returns:
        The SVG document as a string.

    Raises:
        ValueError: on a duplicate node id or an edge naming an unknown node.
    """
    legend = dict(legend or {})

    # -- index nodes and edges ------------------------------------------------
    index: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.id in index:
            raise ValueError(f"duplicate node id {node.id!r}")
        index[node.id] = i
    n = len(nodes)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    edge_set: dict[tuple[int, int], None] = {}  # ordered set
    for src, dst in edges:
        try:
            a, b = index[src], index[dst]
        except KeyError as exc:
            raise ValueError(f"edge ({src!r}, {dst!r}) names an unknown node") from exc
        if a == b or (a, b) in edge_set:
            continue
        edge_set[(a, b)] = None
        succs[a].append(b)
        preds[b].append(a)

    # -- ranks and row order ----------------------------------------------------
    rank = _ranks(preds, succs)
    if compact_sources:
        for i in range(n):
            if not preds[i] and succs[i]:
                rank[i] = max(min(rank[j] for j in succs[i]) - 1, 0)
    depth = max(rank) + 1 if n else 0
    rows: list[list[int]] = [[] for _ in range(depth)]
    for i in range(n):
        rows[rank[i]].append(i)
    slot = [0.0] * n  # position of each node inside its row
    for row in rows:
        keyed = []
        for pos, i in enumerate(row):
            above = [slot[p] for p in preds[i] if rank[p] < rank[i]]
            bary = sum(above) / len(above) if above else float("inf")
            keyed.append((bary, pos, i))
        keyed.sort()
        row[:] = [i for _, _, i in keyed]
        for pos, i in enumerate(row):
            slot[i] = pos / max(len(row) - 1, 1)

    # -- geometry ---------------------------------------------------------------
    labels = [_truncate(node.label, _MAX_LABEL_CHARS) for node in nodes]
    width = [max(_NODE_MIN_WIDTH, _text_width(lbl) + 2 * _PAD_X) for lbl in labels]
    row_width = [sum(width[i] for i in row) + _GAP_X * (len(row) - 1) for row in rows]
    graph_width = max(row_width, default=0.0)
    top = _MARGIN + (_TITLE_HEIGHT if title else 0)
    x = [0.0] * n  # left edge of each box
    y = [0.0] * n  # top edge of each box
    for r, row in enumerate(rows):
        cursor = _MARGIN + (graph_width - row_width[r]) / 2
        for i in row:
            x[i] = cursor
            y[i] = top + r * (_NODE_HEIGHT + _GAP_Y)
            cursor += width[i] + _GAP_X
    graph_height = depth * _NODE_HEIGHT + max(depth - 1, 0) * _GAP_Y

    # -- colours and legend -----------------------------------------------------
    used_keys = {node.color_key for node in nodes if node.color_key is not None}
    colors = color_for_keys(used_keys | set(legend))
    legend_keys = list(legend) + sorted(used_keys - set(legend))
    legend_lines = [
        _truncate(f"{key}: {legend[key]}" if legend.get(key) else key, _MAX_LEGEND_CHARS)
        for key in legend_keys
    ]
    legend_x = _MARGIN + graph_width + (2 * _MARGIN if n else 0)
    legend_w = (
        _SWATCH + 3 * _PAD_X + max(_text_width(t) for t in legend_lines) if legend_lines else 0.0
    )
    legend_h = _LEGEND_ROW * len(legend_lines) + 2 * _PAD_X - 8 if legend_lines else 0.0

    total_w = (legend_x + legend_w if legend_lines else _MARGIN + graph_width) + _MARGIN
    if title:
        total_w = max(total_w, 2 * _MARGIN + _text_width(title) * 1.2)
    total_h = top + max(graph_height, legend_h) + _MARGIN

    # -- emit -------------------------------------------------------------------
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" '
        f'height="{total_h:.0f}" viewBox="0 0 {total_w:.0f} {total_h:.0f}" '
        f'font-family="ui-monospace, Menlo, Consolas, monospace" font-size="{_FONT_SIZE}">\n',
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        f'fill="{_EDGE}"/></marker></defs>\n',
        '<rect width="100%" height="100%" fill="#ffffff"/>\n',
    ]
    if title:
        out.append(
            f'<text class="title" x="{_MARGIN}" y="{_MARGIN + 4}" font-size="{_FONT_SIZE + 4}" '
            f'font-weight="bold" fill="{_TEXT}">{_esc(title)}</text>\n'
        )

    out.append(f'<g class="edges" fill="none" stroke="{_EDGE}" stroke-width="1.2">\n')
    for a, b in edge_set:
        x1, y1 = x[a] + width[a] / 2, y[a] + _NODE_HEIGHT
        x2, y2 = x[b] + width[b] / 2, y[b]
        if y2 > y1:
            bend = (y2 - y1) / 2
        else:  # edge closing a cycle: loop out below the source and above the target
            bend = _GAP_Y
        out.append(
            f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} '
            f'{x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}" marker-end="url(#arrow)"/>\n'
        )
    out.append("</g>\n")

    out.append(f'<g class="nodes" stroke="{_STROKE}" stroke-width="1">\n')
    for i, node in enumerate(nodes):
        fill = colors[node.color_key] if node.color_key is not None else _NONE_FILL
        tip = node.tooltip or node.label
        cx, cy = x[i] + width[i] / 2, y[i] + _NODE_HEIGHT / 2
        out.append(
            f'<g class="node" id="{_esc("node-" + node.id)}">'
            f"<title>{_esc(tip)}</title>"
            f'<rect x="{x[i]:.1f}" y="{y[i]:.1f}" width="{width[i]:.1f}" '
            f'height="{_NODE_HEIGHT}" rx="6" ry="6" fill="{fill}"/>'
            f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" '
            f'dominant-baseline="central" stroke="none" fill="{_TEXT}">{_esc(labels[i])}</text>'
            "</g>\n"
        )
    out.append("</g>\n")

    if legend_lines:
        out.append(
            f'<g class="legend"><rect x="{legend_x:.1f}" y="{top:.1f}" width="{legend_w:.1f}" '
            f'height="{legend_h:.1f}" rx="4" ry="4" fill="#fafafa" stroke="#999999"/>\n'
        )
        for k, (key, line) in enumerate(zip(legend_keys, legend_lines)):
            row_y = top + _PAD_X + k * _LEGEND_ROW
            out.append(
                f'<rect x="{legend_x + _PAD_X:.1f}" y="{row_y:.1f}" width="{_SWATCH}" '
                f'height="{_SWATCH}" fill="{colors[key]}" stroke="{_STROKE}"/>'
                f'<text x="{legend_x + 2 * _PAD_X + _SWATCH:.1f}" y="{row_y + _SWATCH / 2:.1f}" '
                f'dominant-baseline="central" fill="{_TEXT}">{_esc(line)}</text>\n'
            )
        out.append("</g>\n")

    out.append("</svg>\n")
    return "".join(out)
