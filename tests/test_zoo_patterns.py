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


def _all_invariants(build, x: torch.Tensor, subnets: int = 2, eval_mode: bool = False) -> istfx.ISTModel:
    """Round trip, coverage, mask equivalence and one SGD step per subnet, and the interface."""
    model = build()
    if eval_mode:
        model.eval()
    ist = _compile(model, x, subnets)
    twin_model = build()
    if eval_mode:
        twin_model.eval()
    twin = _compile(twin_model, x, subnets)
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
