"""Patterns of public model zoos, and the IST invariants on architectures built from them.

The patterns are those of torchvision and Hugging Face models rebuilt in plain
``torch.nn`` (tests do not depend on torchvision): depthwise and grouped
convolutions (MobileNet, EfficientNet, ResNeXt, RegNet), in-place activations
(``nn.Hardswish(inplace=True)``), squeeze-excitation, channel shuffle
(ShuffleNet), ``nn.MultiheadAttention`` with packed and separate projections
(ViT, ``nn.TransformerEncoderLayer``) and expert loops (mixture of experts).

The first part pins each fix on one small model; the second draws whole
architectures with hypothesis and checks round trip, coverage, mask
equivalence (float64) and the SGD step on all of them, in training mode and
in evaluation mode. Evaluation mode is tested on architectures whose training
and evaluation graphs coincide (no dropout, no BatchNorm).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    check_coverage,
    check_forward_equivalence,
    check_interface,
    check_round_trip,
    check_sgd_step,
)
from torch import nn

import istfx
from istfx.passes import roles

# -- building blocks (torchvision / Hugging Face patterns in plain torch.nn) -----------------------------


class SqueezeExcite(nn.Module):
    """MobileNetV3/EfficientNet squeeze-excitation: a gate per channel from the pooled input."""

    def __init__(self, channels: int, reduced: int, inplace: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.act = nn.ReLU(inplace=inplace)
        self.gate = nn.Hardsigmoid(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(scale))))


def _compile(model: nn.Module, x: torch.Tensor, subnets: int = 2, **kw) -> istfx.ISTModel:
    return istfx.compile(model, subnets=subnets, example_inputs=(x,), **kw)


def _all_invariants(build, x: torch.Tensor, subnets: int = 2, eval_mode: bool = False, **kw) -> istfx.ISTModel:
    """Round trip, coverage, mask equivalence and one SGD step per subnet, and the interface."""
    model = build()
    if eval_mode:
        model.eval()
    ist = _compile(model, x, subnets, **kw)
    twin_model = build()
    if eval_mode:
        twin_model.eval()
    twin = _compile(twin_model, x, subnets, **kw)
    check_round_trip(ist, 0)
    check_coverage(ist, twin, rounds=range(2))
    check_forward_equivalence(ist, ((x,), {}), 1)
    for s in range(subnets):
        check_sgd_step(ist, ((x,), {}), 1, s)
    check_interface(ist, [((x[:1],), {}), ((torch.cat([x, x]),), {})])
    return ist


def _split_tensors(ist: istfx.ISTModel) -> set[str]:
    return {m.tensor for g in ist.plan.split for m in ist.plan.groups[g].members}


# -- convolutions --------------------------------------------------------------------------------------------


def _conv_stack(groups: int, multiplier: int = 1, transposed: bool = False, channels: int = 12) -> nn.Module:
    torch.manual_seed(0)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(
        nn.Conv2d(2, channels, 1), nn.ReLU(),
        cls(channels, channels * multiplier, 3, padding=1, groups=groups), nn.BatchNorm2d(channels * multiplier),
        nn.ReLU(), nn.Conv2d(channels * multiplier, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double()


def _image(batch: int = 3, channels: int = 2, side: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_subnets_run_and_equal_the_masked_model(multiplier: int) -> None:
    """MobileNet's depthwise conv: the channels split and ``groups`` follows them in every subnet
    (before: "Given groups=24, expected weight to be at least 24 at dimension 0")."""
    ist = _all_invariants(lambda: _conv_stack(12, multiplier), _image())
    assert "2.weight" in _split_tensors(ist)
    conv = next(n for n in ist.decompose(0)[0].graph.nodes if n.target is torch.ops.aten.conv2d.default
                and n.args[1].target == "2.weight")
    assert conv.args[6] == 6  # 12 groups, 2 subnets: 6 each


@pytest.mark.parametrize("groups,multiplier,transposed", [(4, 1, False), (3, 2, False), (4, 1, True)])
def test_grouped_conv_splits_whole_groups(groups: int, multiplier: int, transposed: bool) -> None:
    """ResNeXt/RegNet grouped convs: whole groups (C/groups channels each) are dealt out, not frozen."""
    ist = _all_invariants(lambda: _conv_stack(groups, multiplier, transposed), _image())
    plan = ist.plan
    group = next(plan.groups[g] for g in plan.split if any(m.tensor == "2.weight" for m in plan.groups[g].members))
    assert group.units == groups
    assert {m.unit for m in group.members if m.tensor == "2.weight"} == {12 // groups * (1 if transposed else
                                                                                         multiplier)}


def test_in_place_activations_have_their_out_of_place_rules() -> None:
    """``nn.Hardswish(inplace=True)`` & co. (``aten.hardswish_``, no pointwise tag) no longer freeze channels."""
    torch.manual_seed(0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 8, 1), nn.Hardswish(inplace=True), nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.GELU(), nn.Hardswish(inplace=True), SqueezeExcite(8, 4), nn.Conv2d(8, 4, 1), nn.ReLU6(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
        ).double()

    ist = _all_invariants(build, _image())
    assert {"0.weight", "2.weight", "5.fc1.weight", "6.weight"} <= _split_tensors(ist)
    assert not ist.analysis.diagnostics


def test_in_place_ops_are_looked_up_through_their_out_of_place_op() -> None:
    from istfx.core.rules import lookup, rule_pointwise

    class Node:
        def __init__(self, target):
            self.target = target

    for op in (torch.ops.aten.hardswish_.default, torch.ops.aten.gelu_.default, torch.ops.aten.relu_.default,
               torch.ops.aten.add_.Tensor, torch.ops.aten.hardsigmoid_.default, torch.ops.aten.silu_.default):
        assert lookup(Node(op)) is not None, op
    assert lookup(Node(torch.ops.aten.hardswish_.default)) is lookup(Node(torch.ops.aten.hardswish.default))
    assert lookup(Node(torch.ops.aten.add_.Tensor)) is rule_pointwise


# -- nn.MultiheadAttention ------------------------------------------------------------------------------------


class Attention(nn.Module):
    """nn.MultiheadAttention self-attention then a head; `kdim` != embed_dim gives separate q/k/v projections."""

    def __init__(self, batch_first: bool, separate: bool, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.batch_first, self.separate = batch_first, separate
        kdim = dim + 2 if separate else None
        self.kv = nn.Linear(dim, dim + 2) if separate else None
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        kv = self.kv(x) if self.separate else x
        y, _ = self.attn(x, kv, kv, need_weights=False)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)


def _tokens(batch: int = 3, length: int = 5, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("separate", [False, True])
def test_multihead_attention_splits_heads(batch_first: bool, separate: bool) -> None:
    """The packed in-projection (``unflatten(-1, [3, E])``) compiles (before: IndexError), and heads split."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return Attention(batch_first, separate).double()

    ist = _all_invariants(build, _tokens())
    heads = [ist.plan.groups[g] for g in ist.plan.split if roles(ist)[g] == "heads"]
    assert len(heads) == 1 and heads[0].units == 4
    assert "attn.out_proj.weight" in {m.tensor for m in heads[0].members}


def test_unflatten_with_a_negative_dim_rewrites_the_right_sizes() -> None:
    """``unflatten(-1, [8, 2])`` counts -1 among the input's axes, so its sizes follow the cut axis."""

    class Unflatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 16)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x).unflatten(-1, (8, 2)).relu().sum(-1))

    def build() -> nn.Module:
        torch.manual_seed(0)
        return Unflatten().double()

    x = torch.randn(3, 5, 4, dtype=torch.float64)
    ist = _all_invariants(build, x)
    assert "fc.weight" in _split_tensors(ist)


class DroppedWeights(nn.Module):
    """nn.MultiheadAttention with its default ``need_weights=True``, the averaged weights thrown away."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x)
        return self.head(y)


class EncoderDecoder(nn.Module):
    """nn.TransformerEncoderLayer then nn.TransformerDecoderLayer (sequence first, pre-norm decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, norm_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(x).transpose(0, 1)
        return self.head(self.decoder(x.transpose(0, 1), memory).transpose(0, 1))


@pytest.mark.parametrize("cls", [DroppedWeights, EncoderDecoder])
def test_torch_transformer_layers_split_heads_and_ffn(cls) -> None:
    """Unused averaged attention weights (a dead ``mean`` over heads) do not keep heads whole; encoder and
    decoder layers split their heads (self- and cross-attention) and FFN units."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls().double()

    ist = _all_invariants(build, _tokens())
    labels = roles(ist)
    heads = [g for g in ist.plan.split if labels[g] == "heads"]
    assert len(heads) == (1 if cls is DroppedWeights else 3), str(ist.plan)
    if cls is EncoderDecoder:
        assert any(labels[g] == "ffn" and ist.plan.groups[g].units == 32 for g in ist.plan.split)


# -- channel shuffle (ShuffleNet) ------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNet channel shuffle."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnitV2(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass, half go through a branch; then a shuffle."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.Conv2d(hidden, half, 1), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)


class ShuffleUnitV1(nn.Module):
    """ShuffleNet(v1)'s unit: grouped 1x1 conv, shuffle, depthwise 3x3, grouped 1x1 conv, residual add."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.reduce = nn.Conv2d(channels, channels, 1, groups=groups)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.expand = nn.Conv2d(channels, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = channel_shuffle(torch.relu(self.reduce(x)), self.groups)
        return x + self.expand(self.depthwise(y))


def _stem_body_head(*body: nn.Module, channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, channels, 1), *body, nn.Conv2d(channels, 4, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2)).double()


def test_channel_shuffle_of_concatenated_branches_is_frozen_with_its_reason() -> None:
    """ShuffleNetV2: the shuffled stream (pieces interleaved) is frozen and says why; the branches' hidden
    channels split; a chunk whose pieces are cut differently becomes split_with_sizes (before: a crash)."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _stem_body_head(ShuffleUnitV2(8, 6), ShuffleUnitV2(8, 6))

    ist = _all_invariants(build, _image())
    split = _split_tensors(ist)
    assert {"1.branch.0.weight", "2.branch.0.weight", "1.branch.2.weight"} <= split
    stream = [g for g in ist.plan.groups if any(m.tensor == "1.branch.3.weight" and m.dim == 0 for m in g.members)]
    assert stream and all(g.status == "frozen" for g in stream)
    assert any("interleaved (e.g. a channel shuffle" in r for g in stream for r in g.reasons), stream[0].reasons


def test_channel_shuffle_between_grouped_convs_splits_exactly() -> None:
    """ShuffleNet(v1): grouped conv, shuffle, grouped conv: the two factorisations of the channels have a
    common refinement (8 = 2 x 2 x 2), whose factors split exactly. Each factor is a minor factor of one of
    the views, so the default plan keeps them whole and ``split_inner=True`` cuts them."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _stem_body_head(ShuffleUnitV1(8, 2))

    default = _compile(build(), _image())
    assert not {"1.reduce.weight", "1.depthwise.weight", "1.expand.weight"} & _split_tensors(default)
    assert "minor factor" in str(default.plan)
    ist = _all_invariants(build, _image(), split_inner=True)
    assert {"1.reduce.weight", "1.depthwise.weight", "1.expand.weight"} <= _split_tensors(ist)


# -- Hugging Face mixture of experts ----------------------------------------------------------------------------


def test_hugging_face_experts_split_their_hidden_units_with_the_default_implementation() -> None:
    """Mixtral with transformers' default ``grouped_mm`` experts: ``grouped_mm_fallback``, ``histc`` and
    ``floor_divide`` have rules, so the experts' hidden units split (before: every expert stayed whole).
    float32: torch's grouped_mm kernel has no float64 path, so the full model cannot run in float64."""
    import transformers as tf

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = tf.MixtralConfig(
            vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        )
        return tf.MixtralForCausalLM(config)

    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    ist = istfx.compile(build(), subnets=2, example_inputs={"input_ids": ids})
    assert not ist.plan.diagnostics, ist.plan.diagnostics
    labels = roles(ist)
    experts = [g for g in ist.plan.split
               if any(m.tensor.endswith("experts.down_proj") for m in ist.plan.groups[g].members)]
    assert len(experts) == 1 and ist.plan.groups[experts[0]].units == 24
    assert labels[experts[0]] == "ffn"
    inputs = ((), {"input_ids": ids})
    check_round_trip(ist, 0)
    check_forward_equivalence(ist, inputs, 1, key="logits", atol=1e-5)
    check_sgd_step(ist, inputs, 1, 1, key="logits", atol=1e-5)


# -- roles ---------------------------------------------------------------------------------------------------


def test_roles_of_convolutions_and_packed_projections_are_read_off_the_graph() -> None:
    """Conv channels are ``channels`` (a grouped conv's units: whole groups), kernel windows and the spatial
    positions a linear layer reads are ``spatial`` (before: ``other``, ``heads_in_group``, ``head_dim``), the
    q/k/v selector of a packed projection is no ``heads``."""
    from istfx.passes import describe

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=4), nn.Flatten(),
                        nn.Linear(8 * 3 * 3, 2)).double()
    ist = _compile(cnn, _image())
    labels = describe(ist)
    by_member = {(m.tensor, m.dim): labels[g.id] for g in ist.plan.groups for m in g.members}
    assert by_member[("0.weight", 0)].name == "channels"
    assert by_member[("0.weight", 2)].name == "spatial"
    grouped = next(labels[g.id] for g in ist.plan.groups if any(m.tensor == "2.weight" and m.unit == 2
                                                                 for m in g.members))
    assert grouped.name == "channels" and grouped.detail == "4 groups of 2 channels"
    assert {labels[g.id].name for g in ist.plan.groups if any(m.tensor == "4.weight" and m.dim == 1
                                                             for m in g.members)} == {"channels", "spatial"}
    assert roles(ist) == roles(ist.plan)  # print(plan) agrees (no analysis there)

    torch.manual_seed(0)
    attention = _compile(Attention(True, False).double(), _tokens())
    labels = roles(attention)
    selector = next(g for g in attention.plan.groups if g.units == 3 and g.status == "frozen")
    assert labels[selector.id] == "other"
    assert [labels[g] for g in attention.plan.split if attention.plan.groups[g].units == 4] == ["heads"]
