"""GIST on graph networks: the IST invariants as properties over random depths and widths.

Models: ``istfx.models`` GCN / GraphSAGE (with and without the non-affine
LayerNorm) and PyTorch Geometric's GCN, GraphSAGE, GAT and GIN, on random
graphs of 20-40 nodes. For every drawn architecture the test checks what is
split (each hidden feature axis, or each hidden layer's attention heads, is an
exact group; nothing else is cut) and what is shared (exactly the listed
tensors, e.g. the output bias), then the four invariants: round trip,
coverage, mask equivalence in float64 (forward, and one SGD step reassembled)
and the interface (graphs of other sizes).

With LayerNorm (and for GAT heads averaged by ``concat=False``) cutting is
*approximate*: those tests check that a subnet is exactly the narrower model
of the same class instead.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    ATOL,
    assert_close,
    check_coverage,
    check_forward_equivalence,
    check_interface,
    check_round_trip,
    check_sgd_step,
    examples,
    masked_model,
    subnet_state,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch_geometric.nn import models as pyg_models

import istfx
from istfx.errors import ISTError
from istfx.core.groups import APPROXIMATE, EXACT
from istfx.models import GCN, GraphSAGE

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
OUT = 3  # output classes


# -- graphs ---------------------------------------------------------------------------------


def random_graph(nodes: int, edges: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 node features and a random edge list (duplicates and self loops allowed)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, features, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, nodes, (2, edges), generator=gen)


def inputs(graph: tuple[torch.Tensor, torch.Tensor]) -> tuple[tuple, dict]:
    return graph, {}


# -- the models and what GIST must split / share ----------------------------------------------

# A split group: its number of units and the sorted (tensor, dim) pairs it cuts.
Expected = tuple[int, tuple[tuple[str, int], ...]]


@dataclass(frozen=True)
class Spec:
    family: str
    depth: int
    width: int  # hidden features (GAT: channels per head)
    heads: int  # GAT only
    features: int
    subnets: int
    seed: int

    @property
    def hidden(self) -> int:
        return self.width * self.heads if self.family == "pyg_gat" else self.width


def _feature_groups(spec: Spec, producer: list[str], consumer: list[str], bias: list[str]) -> list[Expected]:
    """One group per hidden layer: rows of the producing weights, bias entries, columns of the next layer."""
    groups = []
    for i in range(spec.depth - 1):
        members = {(f"convs.{i}.{w}", 0) for w in producer} | {(f"convs.{i}.{b}", 0) for b in bias}
        members |= {(f"convs.{i + 1}.{w}", 1) for w in consumer}
        groups.append((spec.width, tuple(sorted(members))))
    return groups


def expected_gcn(spec: Spec) -> tuple[list[Expected], set[str]]:
    return _feature_groups(spec, ["lin.weight"], ["lin.weight"], ["bias"]), {f"convs.{spec.depth - 1}.bias"}


def expected_sage(spec: Spec) -> tuple[list[Expected], set[str]]:
    weights = ["lin_l.weight", "lin_r.weight"]
    return _feature_groups(spec, weights, weights, ["lin_l.bias"]), {f"convs.{spec.depth - 1}.lin_l.bias"}


def expected_gat(spec: Spec) -> tuple[list[Expected], set[str]]:
    """Whole heads (one head: its channels) of every hidden layer; the last layer averages its heads."""
    groups = []
    axis = 1 if spec.heads > 1 else 2  # att_src/att_dst are [1, heads, channels]
    units = spec.heads if spec.heads > 1 else spec.width
    for i in range(spec.depth - 1):
        members = {(f"convs.{i}.att_src", axis), (f"convs.{i}.att_dst", axis), (f"convs.{i}.bias", 0),
                   (f"convs.{i}.lin.weight", 0), (f"convs.{i + 1}.lin.weight", 1)}
        groups.append((units, tuple(sorted(members))))
    last = spec.depth - 1
    return groups, {f"convs.{last}.att_src", f"convs.{last}.att_dst", f"convs.{last}.bias"}


def expected_gin(spec: Spec) -> tuple[list[Expected], set[str]]:
    """Each GINConv's MLP [in, h, h]: its inner units, and (hidden layers) its output features."""
    groups = []
    for i in range(spec.depth):
        units = spec.width if i < spec.depth - 1 else OUT
        inner = {(f"convs.{i}.nn.lins.0.weight", 0), (f"convs.{i}.nn.lins.0.bias", 0),
                 (f"convs.{i}.nn.lins.1.weight", 1)}
        groups.append((units, tuple(sorted(inner))))
        if i < spec.depth - 1:
            out = {(f"convs.{i}.nn.lins.1.weight", 0), (f"convs.{i}.nn.lins.1.bias", 0),
                   (f"convs.{i + 1}.nn.lins.0.weight", 1)}
            groups.append((spec.width, tuple(sorted(out))))
    # eps (a buffer: GIN's fixed self weight) is a scalar; the output bias has the classes' axis.
    shared = {f"convs.{i}.eps" for i in range(spec.depth)} | {f"convs.{spec.depth - 1}.nn.lins.1.bias"}
    return groups, shared


@dataclass(frozen=True)
class Family:
    build: Callable[[Spec], nn.Module]
    expected: Callable[[Spec], tuple[list[Expected], set[str]]]


def _pyg(name: str, **kwargs) -> Callable[[Spec], nn.Module]:
    def build(spec: Spec) -> nn.Module:
        extra = {"heads": spec.heads} if name == "GAT" else {}
        return getattr(pyg_models, name)(spec.features, spec.hidden, num_layers=spec.depth, out_channels=OUT,
                                         **extra, **kwargs)
    return build


FAMILIES = {
    "gcn": Family(lambda s: GCN(s.features, s.width, OUT, num_layers=s.depth), expected_gcn),
    "graphsage": Family(lambda s: GraphSAGE(s.features, s.width, OUT, num_layers=s.depth), expected_sage),
    "pyg_gcn": Family(_pyg("GCN"), expected_gcn),
    "pyg_graphsage": Family(_pyg("GraphSAGE"), expected_sage),
    "pyg_gat": Family(_pyg("GAT"), expected_gat),
    "pyg_gin": Family(_pyg("GIN"), expected_gin),
}


@st.composite
def specs(draw, family: str, min_depth: int = 1, per_subnet: int = 1) -> Spec:
    subnets = draw(st.integers(2, 3))
    heads = draw(st.integers(1, 4)) if family == "pyg_gat" else 1
    if heads > 1:
        subnets = min(subnets, heads)  # whole heads are dealt out: at least one per subnet
        width = draw(st.integers(1, 4))
    else:
        width = draw(st.integers(per_subnet * subnets, 10))
    return Spec(family, draw(st.integers(min_depth, 4)), width, heads, draw(st.integers(2, 6)), subnets,
                draw(st.integers(0, 2**16)))


def build(spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed)
    return FAMILIES[spec.family].build(spec).double()


def graph_for(spec: Spec, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(spec.seed + salt)
    nodes = int(torch.randint(20, 41, (1,), generator=gen))
    edges = int(torch.randint(nodes, 4 * nodes, (1,), generator=gen))
    return random_graph(nodes, edges, spec.features, spec.seed + salt)


def split_groups(ist: istfx.ISTModel) -> list[Expected]:
    return sorted((ist.plan.groups[g].units, tuple(sorted({(m.tensor, m.dim) for m in ist.plan.groups[g].members})))
                  for g in ist.plan.split)


def whole_tensors(ist: istfx.ISTModel) -> set[str]:
    slices = ist.slices(0)
    return {n for n in ist.trainable_state if not slices.is_cut(n)}


def assert_split_as_expected(ist: istfx.ISTModel, spec: Spec, status: str = EXACT) -> None:
    groups, shared = FAMILIES[spec.family].expected(spec)
    got = split_groups(ist)
    assert got == sorted(groups), f"{spec}\n{ist.plan}"
    assert all(ist.plan.groups[g].status == status for g in ist.plan.split), str(ist.plan)
    assert whole_tensors(ist) == shared, f"shared: {sorted(whole_tensors(ist))} != {sorted(shared)}\n{ist.plan}"


def nothing_to_split(spec: Spec) -> bool:
    """One graph convolution (GIN aside: its MLP has a hidden layer) leaves no hidden features."""
    return spec.depth == 1 and spec.family != "pyg_gin"


# -- the invariants, exact groups ------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=examples(2), **SETTINGS)
@given(data=st.data())
def test_gnn_invariants(family: str, data) -> None:
    """Split groups and shared tensors as GIST says; round trip, coverage, mask equivalence, interface."""
    spec = data.draw(specs(family))
    model = build(spec)
    example = graph_for(spec)
    if nothing_to_split(spec):
        with pytest.raises(ISTError, match="can be split|larger than every splittable group"):
            istfx.compile(model, subnets=spec.subnets, example_inputs=example)
        return
    ist = istfx.compile(model, subnets=spec.subnets, example_inputs=example)
    assert not ist.plan.diagnostics, ist.plan.diagnostics  # every op had a rule
    assert_split_as_expected(ist, spec)

    round = data.draw(st.integers(0, 5))
    check_round_trip(ist, round)
    check_coverage(ist, ist, rounds=range(8))  # separate compiles agree: tests/test_families.py
    other = graph_for(spec, salt=1)  # another number of nodes and edges than the example
    check_forward_equivalence(ist, inputs(example), round=round)
    check_forward_equivalence(ist, inputs(other), round=round + 1)
    check_sgd_step(ist, inputs(other), round=round, subnet_index=data.draw(st.integers(0, spec.subnets - 1)))
    check_interface(ist, [inputs(other), inputs(random_graph(1, 0, spec.features, 0)),
                          inputs(random_graph(7, 3, spec.features, 1))], round=round)


def test_gat_split_inner_cuts_channels_exactly() -> None:
    """With split_inner=True the channels inside each head are cut too, and stay exact."""
    spec = Spec("pyg_gat", depth=3, width=4, heads=2, features=5, subnets=2, seed=3)
    ist = istfx.compile(build(spec), subnets=2, example_inputs=graph_for(spec), split_inner=True)
    inner = [g for g in ist.plan.split if ist.plan.groups[g].inner]
    assert len(inner) == 2 and len(ist.plan.split) == 4, str(ist.plan)
    assert all(ist.plan.groups[g].status == EXACT for g in ist.plan.split)
    check_round_trip(ist, 1)
    check_forward_equivalence(ist, inputs(graph_for(spec, salt=1)), round=1)
    check_sgd_step(ist, inputs(graph_for(spec)), round=2, subnet_index=1)


# -- approximate cuts: the subnet is the narrower model -----------------------------------------


def narrower_copy(model: nn.Module, subnet: nn.Module, **changes) -> nn.Module:
    """A model of `model`'s class with `changes` to its constructor and the subnet's tensors."""
    narrow = type(model)(**changes).double()
    state = {name: tensor.detach() for name, tensor in subnet_state(subnet).items()}
    narrow.load_state_dict(state, strict=True)
    return narrow.train()


@pytest.mark.parametrize("cls", [GCN, GraphSAGE])
@settings(max_examples=examples(2), **SETTINGS)
@given(data=st.data())
def test_layer_norm_cut_is_the_narrower_model(cls: type, data) -> None:
    """norm=True: hidden groups are approximate; a subnet is the same model with fewer hidden features."""
    family = "gcn" if cls is GCN else "graphsage"
    spec = data.draw(specs(family, min_depth=2, per_subnet=2))
    torch.manual_seed(spec.seed)
    model = cls(spec.features, spec.width, OUT, num_layers=spec.depth, norm=True).double()
    example = graph_for(spec)
    ist = istfx.compile(model, subnets=spec.subnets, example_inputs=example, split_approximate=True)
    assert_split_as_expected(ist, spec, status=APPROXIMATE)
    assert all("normalised over (aten.layer_norm)" in ist.plan.groups[g].reasons for g in ist.plan.split)
    check_round_trip(ist, 0)
    check_coverage(ist, ist, rounds=range(8))
    other = graph_for(spec, salt=1)
    check_interface(ist, [inputs(other)], round=1)

    slices = ist.slices(1)
    differs = []
    for s, subnet in enumerate(ist.decompose(1)):
        held = ist.plan.counts(ist.plan.groups[ist.plan.split[0]])[s]
        narrow = narrower_copy(model, subnet, in_channels=spec.features, hidden_channels=held,
                               out_channels=OUT, num_layers=spec.depth, norm=True)
        assert_close(subnet(*other), narrow(*other), f"subnet {s} vs {cls.__name__}(hidden={held})")
        # ...and not the masked full model, whose LayerNorm also counts the zeroed features.
        differs.append(not torch.allclose(subnet(*other), masked_model(ist, slices, s)(*other), atol=1e-6))
    assert any(differs), "LayerNorm cut came out exact"


def test_layer_norm_is_not_cut_by_default() -> None:
    model = GCN(4, 8, OUT, num_layers=2, norm=True).double()
    with pytest.raises(ISTError, match=r"normalised over \(aten.layer_norm\)"):
        istfx.compile(model, subnets=2, example_inputs=random_graph(20, 40, 4, seed=0))


def test_gat_mean_over_heads_is_approximate() -> None:
    """concat=False averages the heads: cut, a subnet is the GAT with fewer heads (not a masked GAT).

    A masked GAT would still divide by all H heads, so a subnet trained to
    match it would learn heads S times too large for the reassembled model;
    averaging its own heads keeps the scale, hence approximate and opt-in.
    """
    spec = Spec("pyg_gat", depth=2, width=3, heads=4, features=5, subnets=2, seed=5)
    model = build(spec)
    example = graph_for(spec)
    ist = istfx.compile(model, subnets=2, example_inputs=example, split_approximate=True)
    last = [g for g in ist.plan.groups if ("convs.1.att_src", 1) in {(m.tensor, m.dim) for m in g.members}]
    assert len(last) == 1 and last[0].status == APPROXIMATE, str(ist.plan)
    assert "reduced over (aten.mean)" in last[0].reasons  # (so only split_approximate=True cuts it)
    assert last[0].id in ist.plan.split
    check_round_trip(ist, 0)
    other = graph_for(spec, salt=1)
    slices = ist.slices(2)
    for s, subnet in enumerate(ist.decompose(2)):
        narrow = pyg_models.GAT(spec.features, 2 * spec.width, num_layers=2, out_channels=OUT, heads=2).double()
        narrow.load_state_dict({k: v.detach() for k, v in subnet_state(subnet).items()}, strict=True)
        assert_close(subnet(*other), narrow.train()(*other), f"subnet {s} vs GAT(heads=2)")
        masked = masked_model(ist, slices, s)(*other)
        assert not torch.allclose(subnet(*other), masked, atol=1e-6)


# -- the reference models ---------------------------------------------------------------------


@pytest.mark.parametrize("ours,theirs", [(GCN, "GCN"), (GraphSAGE, "GraphSAGE")])
def test_reference_models_match_pyg(ours: type, theirs: str) -> None:
    """istfx.models GCN/GraphSAGE compute what PyG's do with the same weights (graphs without self loops)."""
    torch.manual_seed(0)
    reference = getattr(pyg_models, theirs)(6, 8, num_layers=3, out_channels=OUT).double()
    model = ours(6, 8, OUT, num_layers=3).double()
    model.load_state_dict(reference.state_dict(), strict=True)
    x, edge_index = random_graph(30, 90, 6, seed=11)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    assert_close(model(x, edge_index), reference(x, edge_index), f"{ours.__name__} vs PyG {theirs}")


def test_reference_models_reject_bad_graphs() -> None:
    model = GCN(4, 8, OUT)
    with pytest.raises(ValueError, match=r"x must be \[num_nodes, 4\]"):
        model(torch.randn(5, 3), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"edge_index must be \[2, num_edges\]"):
        model(torch.randn(5, 4), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer node ids"):
        model(torch.randn(5, 4), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="num_layers"):
        GraphSAGE(4, 8, OUT, num_layers=0)


# -- rules: neighbour softmax, segments and sums of products ----------------------------------------


class SegmentAttention(nn.Module):
    """Multi-head neighbour attention and a per-graph readout, in plain aten ops.

    Softmax over each node's incoming edges via ``index_reduce(amax)`` and
    ``index_add``; ``index_fill`` silences the first target node; the readout
    sums the nodes of each graph with ``segment_reduce`` (CSR offsets).
    """

    def __init__(self, features: int, heads: int, channels: int) -> None:
        super().__init__()
        self.heads, self.channels = heads, channels
        self.lin = nn.Linear(features, heads * channels, bias=False)
        self.att = nn.Parameter(torch.randn(heads, channels))
        self.out = nn.Linear(heads * channels, OUT)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        source, target = edge_index[0], edge_index[1]
        h = self.lin(x).view(-1, self.heads, self.channels)
        logits = (h * self.att).sum(-1).index_select(0, source)  # [edges, heads]
        top = logits.new_zeros(n, self.heads).index_reduce(0, target, logits, "amax", include_self=False)
        weight = (logits - top.index_select(0, target)).exp()
        total = weight.new_zeros(n, self.heads).index_add(0, target, weight)
        alpha = weight / total.index_select(0, target)
        messages = h.index_select(0, source) * alpha.unsqueeze(-1)
        nodes = h.new_zeros(h.shape).index_add(0, target, messages).index_fill(0, target[:1], 0.0)
        graphs = torch.segment_reduce(nodes.reshape(n, -1), "sum", offsets=offsets)
        return self.out(torch.relu(graphs))


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
def test_neighbour_softmax_and_segment_ops_pass_heads_through() -> None:
    """Heads pass through index_reduce/index_add/index_fill/segment_reduce; node axes are not cut."""
    torch.manual_seed(0)
    model = SegmentAttention(5, heads=4, channels=3).double()
    x, edge_index = random_graph(24, 70, 5, seed=2)
    offsets = torch.tensor([0, 10, 24])
    ist = istfx.compile(model, subnets=2, example_inputs=(x, edge_index, offsets))
    assert not ist.plan.diagnostics, ist.plan.diagnostics
    assert split_groups(ist) == [(4, (("att", 0), ("lin.weight", 0), ("out.weight", 1)))], str(ist.plan)
    check_round_trip(ist, 0)
    x2, e2 = random_graph(31, 50, 5, seed=3)
    check_forward_equivalence(ist, ((x2, e2, torch.tensor([0, 4, 20, 31])), {}), round=1)
    check_sgd_step(ist, ((x, edge_index, offsets), {}), round=0, subnet_index=0)


class ProductSum(nn.Module):
    """(sigmoid(h) * factor).sum(-1) beside a linear readout of h: exact only if `factor` is a parameter."""

    def __init__(self, factor: str) -> None:
        super().__init__()
        self.factor = factor
        self.lin = nn.Linear(4, 8, bias=False)
        self.att = nn.Parameter(torch.randn(8))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.factor == "parameter":
            other = self.att
        elif self.factor == "parameter_view":
            other = self.att.view(1, -1)
        else:  # sigmoid(0) = 1/2: masked units still add terms
            other = torch.sigmoid(h)
        return self.out(torch.tanh(h)) + (torch.sigmoid(h) * other).sum(-1, keepdim=True)


@pytest.mark.parametrize("factor,status", [("parameter", EXACT), ("parameter_view", EXACT),
                                           ("activation", APPROXIMATE)])
def test_sum_of_product_with_a_parameter_is_a_contraction(factor: str, status: str) -> None:
    """sum(s * att) contracts like einsum (masked att kills the terms); a sum of two activations stays approximate."""
    torch.manual_seed(0)
    model = ProductSum(factor).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ist = istfx.compile(model, subnets=2, example_inputs=(x,), split_approximate=True)
    (gid,) = [g for g in ist.plan.split if ("lin.weight", 0) in {(m.tensor, m.dim) for m in ist.plan.groups[g].members}]
    assert ist.plan.groups[gid].status == status, str(ist.plan)
    if status == EXACT:
        assert ("att", 0) in {(m.tensor, m.dim) for m in ist.plan.groups[gid].members}
        check_forward_equivalence(ist, ((torch.randn(3, 4, dtype=torch.float64),), {}), round=1)
        check_sgd_step(ist, ((x,), {}), round=0, subnet_index=1)  # att lives on the root module
    else:
        slices = ist.slices(1)
        subnet = ist.decompose(1)[0]
        assert not torch.allclose(subnet(x), masked_model(ist, slices, 0)(x), atol=ATOL)


def test_inspect_gat_is_quiet_and_names_heads(tmp_path, capsys) -> None:
    """istfx inspect on a GAT prints the plan (heads split, mean over heads approximate) and no export noise."""
    from istfx.cli import main

    path = tmp_path / "gat.py"
    path.write_text(
        "import torch\n"
        "from torch_geometric.nn.models import GAT\n"
        "torch.manual_seed(0)\n"
        "model = GAT(5, 12, num_layers=2, out_channels=3, heads=4)\n"
        "example_inputs = (torch.randn(20, 5), torch.randint(0, 20, (2, 60)))\n"
    )
    assert main(["inspect", str(path), "--subnets", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert re.search(r"g\d+\s+4\s+exact\s+heads\s+split 2/2\s+convs\.0\.att_src\[1\]", out), out
    assert re.search(r"approximate\s+\w+\s+shared\s+convs\.1\.att_src\[1\]", out), out
    assert "reduced over (aten.mean)" in out

