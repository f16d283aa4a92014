"""The dependency-free SVG graph renderer."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from istfx.draw.svg import SvgNode, color_for_keys, render_graph_svg

NS = {"s": "http://www.w3.org/2000/svg"}


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == cls]


def _node_groups(root: ET.Element) -> list[ET.Element]:
    return _groups(root, "node")


def _rows(svg: str) -> dict[str, float]:
    """Top y coordinate of each node's box, keyed by the group id."""
    return {g.get("id"): float(g.find("s:rect", NS).get("y")) for g in _node_groups(_parse(svg))}


def _fill(group: ET.Element) -> str:
    rect = group.find("s:rect", NS)
    assert rect is not None
    return rect.get("fill", "")


def _diamond() -> tuple[list[SvgNode], list[tuple[str, str]]]:
    nodes = [
        SvgNode("x", "input x", "input", "placeholder x: f32[B, 64]"),
        SvgNode("a", "linear", "split"),
        SvgNode("b", "batch_norm", "split"),
        SvgNode("c", "relu", None),
        SvgNode("out", "output", "input"),
    ]
    edges = [("x", "a"), ("x", "b"), ("a", "c"), ("b", "c"), ("c", "out")]
    return nodes, edges


def test_valid_xml_with_one_title_per_node() -> None:
    nodes, edges = _diamond()
    svg = render_graph_svg(nodes, edges, legend={"split": "split by IST"}, title="demo")
    root = _parse(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    groups = _node_groups(root)
    assert len(groups) == len(nodes)
    titles = [g.findall("s:title", NS) for g in groups]
    assert all(len(t) == 1 for t in titles)
    assert len(list(root.iter("{http://www.w3.org/2000/svg}title"))) == len(nodes)
    # Explicit tooltip wins; otherwise the label is the tooltip.
    by_id = {g.get("id"): g for g in groups}
    assert by_id["node-x"].find("s:title", NS).text == "placeholder x: f32[B, 64]"
    assert by_id["node-c"].find("s:title", NS).text == "relu"
    # One drawn path per edge.
    (edge_group,) = _groups(root, "edges")
    assert len(edge_group.findall("s:path", NS)) == len(edges)


def test_colours_follow_keys() -> None:
    nodes, edges = _diamond()
    root = _parse(render_graph_svg(nodes, edges))
    fill = {g.get("id"): _fill(g) for g in _node_groups(root)}
    assert fill["node-a"] == fill["node-b"]  # both "split"
    assert fill["node-x"] == fill["node-out"]  # both "input"
    assert fill["node-a"] != fill["node-x"]
    assert fill["node-c"] not in {fill["node-a"], fill["node-x"]}  # None is grey


def test_colours_are_deterministic_and_distinct() -> None:
    keys = [f"key{i}" for i in range(60)]
    colours = color_for_keys(keys)
    assert len(set(colours.values())) == len(keys)
    assert color_for_keys(reversed(keys)) == colours
    nodes = [SvgNode(str(i), k, k) for i, k in enumerate(keys)]
    a = render_graph_svg(nodes, [])
    b = render_graph_svg(nodes, [])
    assert a == b


def test_layers_flow_top_to_bottom() -> None:
    nodes, edges = _diamond()
    y = _rows(render_graph_svg(nodes, edges))
    assert y["node-x"] < y["node-a"] == y["node-b"] < y["node-c"] < y["node-out"]


def test_longest_path_rank() -> None:
    # The shortcut x -> out must not pull "out" up next to "a".
    nodes = [SvgNode(i, i, None) for i in ("x", "a", "b", "out")]
    edges = [("x", "a"), ("a", "b"), ("b", "out"), ("x", "out")]
    y = _rows(render_graph_svg(nodes, edges))
    assert y["node-x"] < y["node-a"] < y["node-b"] < y["node-out"]


def test_escaping() -> None:
    nasty = 'a<b & c>d "q" \'s\''
    nodes = [SvgNode("n<1>&", nasty, "k<&>", tooltip="t<&>t"), SvgNode("m", "ok", None)]
    svg = render_graph_svg(nodes, [("n<1>&", "m")], legend={"k<&>": "desc <&>"}, title="T<&>")
    root = _parse(svg)
    group = _node_groups(root)[0]
    assert group.get("id") == "node-n<1>&"
    assert group.find("s:title", NS).text == "t<&>t"
    assert group.find("s:text", NS).text == nasty
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "T<&>" in texts
    assert "k<&>: desc <&>" in texts


def test_control_characters_do_not_break_xml() -> None:
    nodes = [SvgNode("a", "bad\x00\x1bchars\nline2", None, tooltip="x\x07y")]
    _parse(render_graph_svg(nodes, []))


def test_long_labels_are_truncated() -> None:
    label = "very_long_operator_name_" * 10
    root = _parse(render_graph_svg([SvgNode("a", label, None)], []))
    group = _node_groups(root)[0]
    shown = group.find("s:text", NS).text
    assert len(shown) < len(label) and shown.endswith("\u2026")
    assert group.find("s:title", NS).text == label  # full text stays in the tooltip


def test_legend_lists_keys() -> None:
    nodes, edges = _diamond()
    legend_text = {"split": "split by IST", "extra": "unused"}
    root = _parse(render_graph_svg(nodes, edges, legend=legend_text))
    (legend,) = _groups(root, "legend")
    texts = [t.text for t in legend.findall("s:text", NS)]
    assert texts == ["split: split by IST", "extra: unused", "input"]
    swatches = [r.get("fill") for r in legend.findall("s:rect", NS)][1:]  # first is the frame
    fill = {g.get("id"): _fill(g) for g in _node_groups(root)}
    assert swatches[0] == fill["node-a"] and swatches[2] == fill["node-x"]
    # No keys at all: no legend.
    plain = _parse(render_graph_svg([SvgNode("a", "a", None)], []))
    assert not _groups(plain, "legend")


def test_edge_cases() -> None:
    _parse(render_graph_svg([], []))
    _parse(render_graph_svg([], [], legend={"k": "v"}, title="empty"))
    # Cycles, self-loops and duplicate edges still render.
    nodes = [SvgNode(i, i, None) for i in "abc"]
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("b", "b"), ("a", "b")]
    root = _parse(render_graph_svg(nodes, edges))
    assert len(_node_groups(root)) == 3
    with pytest.raises(ValueError):
        render_graph_svg([SvgNode("a", "a", None)], [("a", "zz")])
    with pytest.raises(ValueError):
        render_graph_svg([SvgNode("a", "a", None), SvgNode("a", "b", None)], [])


def test_large_chain_renders() -> None:
    n = 2000
    nodes = [SvgNode(f"n{i}", f"op_{i}", f"k{i % 7}") for i in range(n)]
    edges = [(f"n{i}", f"n{i + 1}") for i in range(n - 1)]
    root = _parse(render_graph_svg(nodes, edges))
    assert len(_node_groups(root)) == n


def test_large_wide_graph_renders() -> None:
    # A few thousand nodes with fan-out and fan-in, as an exported model produces.
    nodes = [SvgNode("src", "src", None)]
    edges = []
    for layer in range(30):
        for j in range(100):
            nodes.append(SvgNode(f"{layer}.{j}", f"op {layer}.{j}", f"k{j % 5}"))
            edges.append((f"{layer - 1}.{j}" if layer else "src", f"{layer}.{j}"))
            if layer and j:
                edges.append((f"{layer - 1}.{j - 1}", f"{layer}.{j}"))
    root = _parse(render_graph_svg(nodes, edges))
    assert len(_node_groups(root)) == len(nodes)


def test_compact_sources() -> None:
    # "w" feeds only the last op; compacted, it sits in the row just above it.
    nodes = [SvgNode(i, i, None) for i in ("x", "a", "b", "w", "c")]
    edges = [("x", "a"), ("a", "b"), ("b", "c"), ("w", "c")]
    plain = _rows(render_graph_svg(nodes, edges))
    assert plain["node-w"] == plain["node-x"]
    compact = _rows(render_graph_svg(nodes, edges, compact_sources=True))
    assert compact["node-w"] == compact["node-b"] < compact["node-c"]
    assert compact["node-x"] < compact["node-a"]
