"""Property tests of the depth pass on residual architectures drawn from public zoos' patterns.

Hypothesis draws MLPs and CNNs (float64) whose blocks mix what torchvision,
timm and the ResIST code write:

- the add: ``skip + out`` or in place, ``out += skip`` (torchvision's
  BasicBlock/Bottleneck, ResIST's PreActBlock);
- the branch's scale: none, a constant (``0.5 * f(x)``), LayerScale
  (``gamma * f(x)``, also ``f(x).mul_(gamma)``), drop-path (timm's
  ``x.div(keep) * mask`` and torchvision's ``stochastic_depth``), LayerScale
  then drop-path (ConvNeXt, CaiT);
- pre-activation (norm and ReLU inside the branch, ResIST's PreActBlock
  takes its projection shortcut after them) and post-activation (ReLU after
  the add, in place or not) blocks;
- identity skips and strided/projection shortcuts (shared, or dealt out
  with ``shortcut_blocks="drop"``);
- BatchNorm with running or batch statistics, LayerNorm, no norm.

Checked on every draw, with the width split on or off and both depth
scalings: round trip (bit for bit), coverage (units and blocks), mask
equivalence (a subnet equals the full model with the units it does not hold
zeroed and the branches of the blocks it skips removed, in training and in
evaluation mode; a model whose Python code branches on ``self.training``, as
drop-path does, has subnets that refuse evaluation mode) and the one-step SGD
equivalence; the full model's evaluation-time scaling equals scaling the
branch outputs by p.

The reference side never uses istfx's dropping or scaling: each test block
has a Python ``factor`` (1 at capture, so it adds no node) that the reference
copy sets to 0 (the branch is not computed at all, so random drop-path draws
stay aligned with the subnet's, which has no such block) or to a scale.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    assert_close,
    check_coverage,
    check_interface,
    check_round_trip,
    default_loss,
    examples,
    model_tensor,
    snapshot,
    subnet_state,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import istfx
from istfx.errors import ISTError
from istfx.testing import held_mask, masked_state

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "derandomize": True}
SCALES = ["none", "const", "layerscale", "layerscale_inplace", "drop_path", "stochastic_depth",
          "layerscale_drop_path"]
ADDS = ["plain", "inplace"]


@dataclass(frozen=True)
class BlockSpec:
    pre: bool  # pre-activation branch, else ReLU after the add
    add: str  # "plain": skip + out | "inplace": out += skip
    scale: str  # one of SCALES
    projection: bool  # a strided (CNN) / widening (MLP) block with a projection shortcut
    inplace_relu: bool  # post-activation ReLU as nn.ReLU(inplace=True)


@dataclass(frozen=True)
class NetSpec:
    conv: bool
    width: int
    hidden: int
    norm: str  # "none" | "bn" | "bn_batch" | "ln" (MLP only)
    blocks: tuple[BlockSpec, ...]
    drop_rate: float  # drop-path rate of the drop-path blocks
    subnets: int
    min_depth: int | None
    split_width: bool
    scaling: str  # "eval" | "train"
    shortcut_blocks: str  # "share" | "drop"
    seed: int

    @property
    def branches_on_training(self) -> bool:
        """Whether the model's Python code branches on ``self.training`` (drop-path with a rate > 0)."""
        return self.drop_rate > 0 and any("drop" in b.scale or "depth" in b.scale for b in self.blocks)


# -- the models ---------------------------------------------------------------------------------


def _norm(kind: str, dim: int, conv: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "ln":
        return nn.LayerNorm(dim)
    return (nn.BatchNorm2d if conv else nn.BatchNorm1d)(dim, track_running_stats=kind == "bn")


class LayerScale(nn.Module):
    """timm's LayerScale; ``x.mul_(gamma)`` when `inplace`."""

    def __init__(self, dim: int, conv: bool, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.linspace(0.2, 0.8, dim).reshape((dim, 1, 1) if conv else (dim,)))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """timm's drop_path (``style="timm"``) or torchvision's stochastic_depth(mode="row")."""

    def __init__(self, rate: float, style: str) -> None:
        super().__init__()
        self.rate, self.style = rate, style

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if self.style == "timm":
            return x.div(keep) * x.new_empty(shape).bernoulli_(keep)
        noise = torch.empty(list(shape), dtype=x.dtype, device=x.device).bernoulli_(keep)
        noise.div_(keep)
        return x * noise


class Block(nn.Module):
    """One residual block; ``factor`` scales (or, at 0, removes) its branch in reference copies."""

    def __init__(self, spec: BlockSpec, net: NetSpec, d_in: int, d_out: int) -> None:
        super().__init__()
        conv, h = net.conv, net.hidden
        self.spec, self.factor = spec, 1.0
        stride = 2 if spec.projection and conv else 1

        def layer(a: int, b: int, s: int = 1) -> nn.Module:
            return nn.Conv2d(a, b, 3, s, 1) if conv else nn.Linear(a, b)

        self.norm_in = _norm(net.norm, d_in, conv) if spec.pre else nn.Identity()
        self.f1, self.f2 = layer(d_in, h, stride), layer(h, d_out)
        self.norm_out = nn.Identity() if spec.pre else _norm(net.norm, d_out, conv)
        self.shortcut = None
        if spec.projection:
            self.shortcut = nn.Conv2d(d_in, d_out, 1, stride, bias=False) if conv else nn.Linear(d_in, d_out, bias=False)
        self.ls = LayerScale(d_out, conv, spec.scale == "layerscale_inplace") if "layerscale" in spec.scale else None
        style = "torchvision" if spec.scale == "stochastic_depth" else "timm"
        self.drop = DropPath(net.drop_rate, style) if "drop" in spec.scale or "depth" in spec.scale else None
        self.relu = nn.ReLU(inplace=spec.inplace_relu)

    def forward(self, x):
        spec = self.spec
        skip = x
        if spec.pre:
            x = torch.relu(self.norm_in(x))  # ResIST's PreActBlock: a projection reads the activated input
        if self.shortcut is not None:
            skip = self.shortcut(x)
        if self.factor == 0.0:
            out = skip
        else:
            out = self.norm_out(self.f2(torch.relu(self.f1(x))))
            if spec.scale == "const":
                out = 0.5 * out
            if self.ls is not None:
                out = self.ls(out)
            if self.drop is not None:
                out = self.drop(out)
            if self.factor != 1.0:
                out = out * self.factor
            if spec.add == "inplace":
                out += skip
            else:
                out = skip + out
        return out if spec.pre else self.relu(out)


class Net(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        d = spec.width
        self.conv = spec.conv
        self.stem = nn.Conv2d(1, d, 3, padding=1) if spec.conv else nn.Linear(5, d)
        blocks = []
        for b in spec.blocks:
            d_out = d + 2 if b.projection else d
            blocks.append(Block(b, spec, d, d_out))
            d = d_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        out = self.blocks(self.stem(x))
        return self.head(out.mean(dim=(2, 3)) if self.conv else out)


def build(spec: NetSpec) -> Net:
    torch.manual_seed(spec.seed)
    model = Net(spec).double()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def make_inputs(spec: NetSpec, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, 6, 6) if spec.conv else (batch, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@st.composite
def block_specs(draw, conv: bool) -> BlockSpec:
    return BlockSpec(pre=draw(st.booleans()), add=draw(st.sampled_from(ADDS)), scale=draw(st.sampled_from(SCALES)),
                     projection=draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else False,
                     inplace_relu=draw(st.booleans()))


@st.composite
def net_specs(draw) -> NetSpec:
    conv = draw(st.booleans())
    blocks = tuple(draw(st.lists(block_specs(conv), min_size=1, max_size=4)))
    if all(b.projection for b in blocks):  # at least one identity block to deal out
        blocks = blocks + (BlockSpec(True, "inplace", "layerscale", False, False),)
    identity = sum(not b.projection for b in blocks)
    return NetSpec(
        conv=conv, width=draw(st.integers(4, 6)), hidden=draw(st.integers(4, 6)),
        norm=draw(st.sampled_from(["none", "bn", "bn_batch"] + ([] if conv else ["ln"]))),
        blocks=blocks, drop_rate=draw(st.sampled_from([0.0, 0.25])), subnets=draw(st.integers(1, 3)),
        min_depth=draw(st.one_of(st.none(), st.integers(1, identity))), split_width=draw(st.booleans()),
        scaling=draw(st.sampled_from(["eval", "train"])), shortcut_blocks=draw(st.sampled_from(["share", "drop"])),
        seed=draw(st.integers(0, 2**16)),
    )


def compile_spec(spec: NetSpec) -> istfx.ISTModel:
    return istfx.compile(build(spec), subnets=spec.subnets, example_inputs=(make_inputs(spec, 4, 0),), blocks="*",
                         min_depth=spec.min_depth, width=spec.split_width, depth_scaling=spec.scaling,
                         shortcut_blocks=spec.shortcut_blocks, seed=spec.seed)


# -- reference side ------------------------------------------------------------------------------


def block_index(module: str) -> int:
    """The test model's block behind a plan block's module path (``blocks.2`` or deeper)."""
    parts = module.split(".")
    assert parts[0] == "blocks" and len(parts) >= 2, f"block named {module!r}, expected blocks.<i>..."
    return int(parts[1])


def reference(ist: istfx.ISTModel, round: int, subnet: int) -> nn.Module:
    """A copy of the model computing what subnet `subnet` of `round` should, from its own code.

    Units the subnet does not hold are zeroed; blocks it skips lose their
    branch; blocks it holds are scaled by 1/p under ``depth_scaling="train"``.
    """
    model = copy.deepcopy(ist.model)
    with torch.no_grad():
        for name, value in masked_state(ist, ist.slices(round), subnet).items():
            model_tensor(ist, model, name).copy_(value)
    held = set(ist.plan.block_assignment(round)[subnet])
    scale = 1.0 / ist.plan.keep_probability if ist.plan.depth_scaling == "train" else 1.0
    for b, block in enumerate(ist.plan.blocks):
        model.blocks[block_index(block.module)].factor = scale if b in held else 0.0
    return model


# -- checks ----------------------------------------------------------------------------------------


def check_blocks_found(ist: istfx.ISTModel, spec: NetSpec) -> None:
    """Every identity block is dealt out; every projection block is shared or, with "drop", dealt out too."""
    identity = [i for i, b in enumerate(spec.blocks) if not b.projection]
    projection = [i for i, b in enumerate(spec.blocks) if b.projection]
    dealt = [block_index(b.module) for b in ist.plan.blocks]
    shared = [block_index(b.module) for b in ist.plan.shared_blocks]
    if spec.shortcut_blocks == "drop":
        assert sorted(dealt) == sorted(identity + projection) and shared == []
    else:
        assert dealt == identity and shared == projection
    # One branch per block, each ending at the block's add.
    assert all(len(b.branches) == 1 for b in ist.plan.blocks)


def check_block_coverage(ist: istfx.ISTModel, rounds=(0, 1, 2)) -> None:
    plan = ist.plan
    n = len(plan.blocks)
    for r in rounds:
        held = plan.block_assignment(r)
        assert held == plan.block_assignment(r)
        assert len(held) == plan.subnets
        if plan.min_depth is None:
            assert sorted(b for h in held for b in h) == list(range(n)), f"round {r}: {held}"
        else:
            assert all(len(h) >= plan.min_depth for h in held)
            assert set().union(*map(set, held)) == set(range(n))


def check_mask_equivalence(ist: istfx.ISTModel, x: torch.Tensor, round: int, train: bool) -> None:
    """Each subnet equals its reference; random drop-path draws are made alike by seeding both calls."""
    for s, subnet in enumerate(ist.decompose(round)):
        expected_model = reference(ist, round, s).train(train)
        subnet.train(train)
        torch.manual_seed(1000 + round)
        expected = expected_model(x)
        torch.manual_seed(1000 + round)
        assert_close(subnet(x), expected, f"subnet {s} of round {round} ({'train' if train else 'eval'} mode)")


def check_sgd_step(ist: istfx.ISTModel, x: torch.Tensor, round: int, subnet_index: int, lr: float = 0.1) -> None:
    """One SGD step on a subnet equals one on its reference, and reassembles into its slices only."""
    s = subnet_index
    subnet = ist.decompose(round)[s]
    slices = ist.slices(round)
    full = reference(ist, round, s).train()
    for module in (subnet, full):
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
        opt.zero_grad()
        torch.manual_seed(2000 + round)
        default_loss(module(x)).backward()
        opt.step()
    state = subnet_state(subnet)
    assert state, "the subnet holds parameters"
    for name in ist.trainable_state:
        if name in state:
            expected = slices.take(name, model_tensor(ist, full, name).detach(), s)
            assert_close(state[name].detach(), expected, f"{name} after one SGD step (subnet {s})")
    before = {n: ist.state_tensor(n).detach().clone() for n in ist.trainable_state}
    report = ist.reassemble([subnet])
    assert report.accepted == [s] and not report.rejected
    for name in ist.trainable_state:
        now = ist.state_tensor(name).detach()
        if name not in state:  # a skipped block's tensors: untouched
            assert torch.equal(now, before[name]), f"{name}: not in subnet {s}, yet changed"
            continue
        held = slices.take(name, now, s)
        assert torch.equal(held, state[name].detach()), f"{name}: held slice not written back"
        if slices.is_cut(name):
            mask = held_mask(slices, name, now.shape, s).bool()
            assert torch.equal(now[~mask], before[name][~mask]), f"{name}: units of other subnets changed"


def check_eval_scaling(ist: istfx.ISTModel, x: torch.Tensor) -> None:
    """Under inference_scaling the full model in eval mode equals its branches scaled by p (by 1 for 'train')."""
    before = snapshot(ist.model)
    factor = ist.plan.keep_probability if ist.plan.depth_scaling == "eval" else 1.0
    expected_model = copy.deepcopy(ist.model).eval()
    for block in ist.plan.blocks:
        expected_model.blocks[block_index(block.module)].factor = factor
    expected = expected_model(x)
    with ist.inference_scaling() as model:
        model.eval()
        assert_close(model(x), expected, "full model under inference_scaling (eval mode)")
    ist.model.train()
    after = snapshot(ist.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "inference_scaling restores the model exactly"


# -- the property test -------------------------------------------------------------------------------


def _blocks(pre: bool, add: str, scales: list[str], projection_at: int | None = None,
            inplace_relu: bool = False) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(pre, add, scale, i == projection_at, inplace_relu) for i, scale in enumerate(scales))


# The zoos' blocks, always run (hypothesis draws the rest): torchvision's ResNet, ResIST's PreActResNet,
# ConvNeXt/CaiT-style LayerScale + drop-path, constant-scaled branches, a drop-path CNN with dealt-out shortcuts.
ZOO_EXAMPLES = [
    NetSpec(True, 4, 4, "bn", _blocks(False, "inplace", ["none"] * 3, 1, True), 0.0, 2, None, True, "eval", "share",
            1),
    NetSpec(True, 4, 5, "bn", _blocks(True, "inplace", ["none"] * 3, 1), 0.0, 2, 1, True, "train", "drop", 2),
    NetSpec(False, 6, 8, "ln", _blocks(True, "plain", ["layerscale_drop_path", "layerscale_inplace",
                                                      "stochastic_depth"]), 0.25, 2, None, True, "eval", "share", 3),
    NetSpec(False, 5, 6, "bn_batch", _blocks(False, "plain", ["const", "const", "drop_path"], 2), 0.0, 3, None, True,
            "train", "share", 4),
    NetSpec(True, 4, 4, "none", _blocks(True, "inplace", ["stochastic_depth", "layerscale", "layerscale_drop_path"],
                                        1), 0.25, 3, 1, True, "eval", "drop", 5),
]


@settings(max_examples=examples(10), **SETTINGS)
@given(spec=net_specs(), round=st.integers(0, 4))
@example(spec=ZOO_EXAMPLES[0], round=1)
@example(spec=ZOO_EXAMPLES[1], round=2)
@example(spec=ZOO_EXAMPLES[2], round=0)
@example(spec=ZOO_EXAMPLES[3], round=3)
@example(spec=ZOO_EXAMPLES[4], round=1)
def test_residual_patterns(spec: NetSpec, round: int) -> None:
    ist = compile_spec(spec)
    check_blocks_found(ist, spec)
    check_block_coverage(ist)
    if ist.plan.split:
        check_coverage(ist, ist, rounds=range(2))
    check_round_trip(ist, round)
    x = make_inputs(spec, 6, seed=round + 1)
    check_mask_equivalence(ist, x, round, train=True)
    if spec.branches_on_training:  # the captured graph holds the training path only: eval mode is refused
        subnet = ist.decompose(round)[0].eval()
        with pytest.raises(ISTError, match="cannot run in evaluation mode"):
            subnet(x)
    else:  # dropout off, batch norm on running statistics, as model.eval()
        check_mask_equivalence(ist, x, round, train=False)
    check_sgd_step(ist, x, round, subnet_index=round % spec.subnets)
    check_eval_scaling(ist, x)
    check_interface(ist, [((make_inputs(spec, b, seed=b),), {}) for b in (3, 5)], round)
