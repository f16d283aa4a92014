"""Property tests of the four IST invariants on random MLPs and CNNs.

Architectures are drawn by hypothesis: MLPs with 1-3 hidden layers (bias,
BatchNorm with or without running statistics, several activations, dropout)
and CNNs with 1-2 conv layers (BatchNorm, padding, max pooling, channel
dropout, an optional hidden linear layer). Every model is float64 so
equivalences hold to summation order. Mask equivalence and the interface are
checked with subnets and model in training and in evaluation mode (models
with dropout in evaluation mode only: dropout masks are random).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    MODES,
    check_coverage,
    check_forward_equivalence,
    check_interface,
    check_round_trip,
    check_sgd_step,
    default_loss,
    examples,
    in_mode,
    masked_model,
    model_tensor,
    subnet_state,
)
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import istfx
from istfx.core.plan import Disjoint, Rolling, unit_counts

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
POLICIES = ["disjoint", "overlap(0.5)", "rolling"]
# BatchNorm with running statistics, with batch statistics only, and without affine parameters.
# (momentum=None is left out: its 1 / num_batches_tracked is data-dependent, torch.export refuses it.)
NORMS = ["none", "bn", "bn_batch", "bn_plain"]
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


# -- random architectures --------------------------------------------------------


@dataclass(frozen=True)
class MLPSpec:
    in_features: int
    widths: tuple[int, ...]
    out_features: int
    bias: bool
    norm: str  # "none" | "bn" (running stats) | "bn_batch" (batch statistics) | "bn_plain" (no affine)
    activation: str
    subnets: int
    seed: int
    dropout: float = 0.0


@dataclass(frozen=True)
class CNNSpec:
    channels: tuple[int, ...]
    padding: int
    norm: str
    pool: bool
    hidden: int  # 0: flatten straight into the head
    bias: bool
    out_features: int
    subnets: int
    seed: int
    side: int = 8
    dropout: float = 0.0


mlp_specs = st.builds(
    MLPSpec,
    in_features=st.integers(2, 8),
    widths=st.lists(st.integers(4, 48), min_size=1, max_size=3).map(tuple),
    out_features=st.integers(1, 5),
    bias=st.booleans(),
    norm=st.sampled_from(NORMS),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    subnets=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    dropout=st.sampled_from([0.0, 0.0, 0.3]),
)

cnn_specs = st.builds(
    CNNSpec,
    channels=st.lists(st.integers(4, 16), min_size=1, max_size=2).map(tuple),
    padding=st.integers(0, 1),
    norm=st.sampled_from(NORMS),
    pool=st.booleans(),
    hidden=st.sampled_from([0, 0, 4, 12]),
    bias=st.booleans(),
    out_features=st.integers(1, 5),
    subnets=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    dropout=st.sampled_from([0.0, 0.0, 0.3]),
)


def modes(spec) -> st.SearchStrategy[str]:
    """Training or evaluation mode; evaluation only with dropout (its masks are random)."""
    return st.just("eval") if spec.dropout else st.sampled_from(MODES)


def _norm(kind: str, width: int, dims: int) -> nn.Module:
    cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    if kind == "bn_plain":
        return cls(width, affine=False)
    return cls(width, track_running_stats=(kind == "bn"))


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norm parameters and running statistics, so misplaced units show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
                if m.track_running_stats:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(3)
    return model


def build_mlp(spec: MLPSpec) -> nn.Module:
    torch.manual_seed(spec.seed)
    layers: list[nn.Module] = []
    prev = spec.in_features
    for width in spec.widths:
        layers.append(nn.Linear(prev, width, bias=spec.bias))
        if spec.norm != "none":
            layers.append(_norm(spec.norm, width, 1))
        layers.append(ACTIVATIONS[spec.activation]())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        prev = width
    layers.append(nn.Linear(prev, spec.out_features, bias=spec.bias))
    return _randomize(nn.Sequential(*layers)).double()


class ConvNet(nn.Module):
    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev, side = 1, spec.side
        for c in spec.channels:
            layers.append(nn.Conv2d(prev, c, kernel_size=3, padding=spec.padding, bias=spec.bias))
            if spec.norm != "none":
                layers.append(_norm(spec.norm, c, 2))
            layers.append(nn.ReLU())
            if spec.dropout:
                layers.append(nn.Dropout2d(spec.dropout))
            prev, side = c, side + 2 * spec.padding - 2
        if spec.pool:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        self.features = nn.Sequential(*layers)
        flat = prev * side * side
        head: list[nn.Module] = [nn.Flatten()]
        if spec.hidden:
            head += [nn.Linear(flat, spec.hidden, bias=spec.bias), nn.Tanh()]
            flat = spec.hidden
        head.append(nn.Linear(flat, spec.out_features, bias=spec.bias))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_cnn(spec: CNNSpec) -> nn.Module:
    torch.manual_seed(spec.seed)
    return _randomize(ConvNet(spec)).double()


def mlp_input(spec: MLPSpec, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(spec.seed + 7919 * seed)
    return torch.randn(batch, spec.in_features, generator=gen, dtype=torch.float64)


def cnn_input(spec: CNNSpec, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(spec.seed + 7919 * seed)
    return torch.randn(batch, 1, spec.side, spec.side, generator=gen, dtype=torch.float64)


def make(spec, policy: str = "disjoint", seed: int = 0) -> tuple[istfx.ISTModel, torch.Tensor]:
    if isinstance(spec, MLPSpec):
        model, x = build_mlp(spec), mlp_input(spec, 6)
    else:
        model, x = build_cnn(spec), cnn_input(spec, 4)
    return istfx.compile(model, subnets=spec.subnets, example_inputs=(x,), policy=policy, seed=seed), x


def new_input(spec, batch: int, seed: int) -> torch.Tensor:
    return mlp_input(spec, batch, seed) if isinstance(spec, MLPSpec) else cnn_input(spec, batch, seed)


def assert_hidden_split(ist: istfx.ISTModel) -> None:
    """Some hidden axis (a Linear's rows or a conv's output channels) is split."""
    assert ist.plan.split, str(ist.plan)
    members = {m.tensor for g in ist.plan.split for m in ist.plan.groups[g].members}
    assert any(name.endswith("weight") for name in members), str(ist.plan)


any_spec = st.one_of(mlp_specs, cnn_specs)


# -- (1) round trip ----------------------------------------------------------------


@settings(max_examples=examples(60), **SETTINGS)
@given(spec=mlp_specs, policy=st.sampled_from(POLICIES), round=st.integers(0, 5))
def test_round_trip_mlp(spec: MLPSpec, policy: str, round: int) -> None:
    ist, _ = make(spec, policy)
    assert_hidden_split(ist)
    check_round_trip(ist, round)
    check_round_trip(ist, round + 1)


@settings(max_examples=examples(50), **SETTINGS)
@given(spec=cnn_specs, policy=st.sampled_from(POLICIES), round=st.integers(0, 5))
def test_round_trip_cnn(spec: CNNSpec, policy: str, round: int) -> None:
    ist, _ = make(spec, policy)
    assert_hidden_split(ist)
    check_round_trip(ist, round)


# -- (2) coverage ------------------------------------------------------------------


@settings(max_examples=examples(50), **SETTINGS)
@given(spec=any_spec, seed=st.integers(0, 2**31 - 1))
def test_coverage_disjoint(spec, seed: int) -> None:
    ist, _ = make(spec, "disjoint", seed)
    twin, _ = make(spec, "disjoint", seed)
    assert twin.plan.token != ist.plan.token
    check_coverage(ist, twin, rounds=range(6))


@settings(max_examples=examples(25), **SETTINGS)
@given(spec=any_spec)
def test_coverage_rolling(spec) -> None:
    """Rolling windows also partition every split group each round."""
    ist, _ = make(spec, "rolling")
    twin, _ = make(spec, "rolling")
    check_coverage(ist, twin, rounds=range(3))


FRACTIONS = [0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 0.7]


@st.composite
def sized_specs(draw):
    """An MLP and per-subnet fractions (summing to at most one) for heterogeneous subnets."""
    subnets = draw(st.integers(2, 4), label="subnets")
    sizes = draw(st.lists(st.sampled_from(FRACTIONS), min_size=subnets, max_size=subnets)
                 .filter(lambda f: sum(f) <= 1), label="sizes")
    spec = draw(mlp_specs, label="spec")
    # Narrow layers, where rounding each fraction to whole units matters most.
    widths = draw(st.lists(st.integers(4, 16), min_size=1, max_size=2).map(tuple), label="widths")
    spec = MLPSpec(spec.in_features, widths, spec.out_features, spec.bias, spec.norm, spec.activation,
                   subnets, spec.seed)
    return spec, sizes


@settings(max_examples=examples(400), **SETTINGS)
@given(
    units=st.integers(1, 64),
    sizes=st.lists(st.sampled_from(FRACTIONS), min_size=1, max_size=4).filter(lambda f: sum(f) <= 1),
)
def test_unit_counts_follow_the_fractions(units: int, sizes: list[float]) -> None:
    """Disjoint counts for `sizes`: at least one unit each, no more than the group has in all,
    within one unit of each fraction's share when every share is at least a unit, and a
    larger fraction never gets fewer units."""
    subnets = len(sizes)
    assume(units >= subnets)  # smaller groups are never split
    for policy in (Disjoint(), Rolling()):
        counts = unit_counts(units, subnets, sizes, policy)
        shares = [f * units for f in sizes]
        where = f"{units} units, sizes {sizes}: counts {counts}"
        assert len(counts) == subnets and min(counts) >= 1, where
        assert sum(counts) <= units, where
        if min(shares) >= 1:
            assert all(abs(c - x) < 1 for c, x in zip(counts, shares)), where
        for a in range(subnets):
            for b in range(subnets):
                assert not (sizes[a] > sizes[b] and counts[a] < counts[b]), where


@settings(max_examples=examples(40), **SETTINGS)
@given(case=sized_specs(), policy=st.sampled_from(["disjoint", "rolling"]))
@example(case=(MLPSpec(3, (4,), 2, True, "none", "relu", 4, 0), [0.05, 0.05, 0.05, 0.5]), policy="disjoint")
@example(case=(MLPSpec(3, (13,), 2, True, "bn", "tanh", 3, 0), [0.05, 0.1, 0.2]), policy="disjoint")
def test_coverage_heterogeneous_sizes(case, policy: str) -> None:
    """With `sizes`, disjoint subnets still hold disjoint units, as many as the plan says,
    at least one each, and a larger fraction never holds fewer units than a smaller one."""
    spec, sizes = case
    model, x = build_mlp(spec), mlp_input(spec, 6)
    ist = istfx.compile(model, subnets=spec.subnets, example_inputs=(x,), policy=policy, sizes=sizes)
    plan = ist.plan
    for r in range(3):
        for gid, parts in plan.assignment(r).items():
            group = plan.groups[gid]
            counts = plan.counts(group)
            where = f"group g{gid} ({group.units} units), sizes {sizes}, round {r}: counts {counts}"
            assert [len(p) for p in parts] == counts, f"{where}, assignment {[p.tolist() for p in parts]}"
            held = torch.cat(list(parts)).tolist()
            assert len(held) == len(set(held)), f"{where}: a unit is held twice"
            assert set(held) <= set(range(group.units))
            assert sum(counts) <= group.units, where
            assert min(counts) >= 1, where
            for a in range(spec.subnets):
                for b in range(spec.subnets):
                    assert not (sizes[a] > sizes[b] and counts[a] < counts[b]), where
    check_round_trip(ist, 1)


def test_assignment_is_the_same_in_another_process() -> None:
    """The assignment depends on (seed, round) only, not on the process (hash seeds, ids)."""
    code = textwrap.dedent(
        """
        import json, torch, istfx
        from torch import nn
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 3))
        ist = istfx.compile(m, subnets=3, example_inputs=(torch.randn(4, 5),), seed=11)
        print(json.dumps([[str(g), [p.tolist() for p in parts]]
                          for r in range(3) for g, parts in sorted(ist.plan.assignment(r).items())]))
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    there = done.stdout.strip().splitlines()[-1]

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 3))
    ist = istfx.compile(m, subnets=3, example_inputs=(torch.randn(4, 5),), seed=11)
    here = json.dumps([[str(g), [p.tolist() for p in parts]]
                       for r in range(3) for g, parts in sorted(ist.plan.assignment(r).items())])
    assert here == there


def test_seed_changes_the_assignment() -> None:
    spec = MLPSpec(4, (32, 32), 3, True, "none", "relu", 4, 0)
    a, _ = make(spec, seed=0)
    b, _ = make(spec, seed=1)
    pa, pb = a.plan.assignment(0), b.plan.assignment(0)
    assert any(not torch.equal(x, y) for g in pa for x, y in zip(pa[g], pb[g]))


# -- (3) mask equivalence ------------------------------------------------------------


@settings(max_examples=examples(70), **SETTINGS)
@given(spec=mlp_specs, policy=st.sampled_from(POLICIES), round=st.integers(0, 5), data=st.data())
def test_mask_equivalence_mlp(spec: MLPSpec, policy: str, round: int, data) -> None:
    ist, x = make(spec, policy)
    batch = data.draw(st.integers(2, 9), label="batch")
    mode = data.draw(modes(spec), label="mode")
    x = mlp_input(spec, batch, seed=1)
    check_forward_equivalence(ist, ((x,), {}), round, mode=mode)
    s = data.draw(st.integers(0, spec.subnets - 1), label="subnet")
    check_sgd_step(ist, ((x,), {}), round, s, mode=mode)


@settings(max_examples=examples(50), **SETTINGS)
@given(spec=cnn_specs, policy=st.sampled_from(POLICIES), round=st.integers(0, 5), data=st.data())
def test_mask_equivalence_cnn(spec: CNNSpec, policy: str, round: int, data) -> None:
    ist, _ = make(spec, policy)
    x = cnn_input(spec, data.draw(st.integers(2, 5), label="batch"), seed=1)
    mode = data.draw(modes(spec), label="mode")
    check_forward_equivalence(ist, ((x,), {}), round, mode=mode)
    s = data.draw(st.integers(0, spec.subnets - 1), label="subnet")
    check_sgd_step(ist, ((x,), {}), round, s, mode=mode)


@settings(max_examples=examples(25), **SETTINGS)
@given(spec=any_spec, data=st.data())
def test_sgd_step_of_every_subnet_reassembles_to_masked_steps(spec, data) -> None:
    """All subnets trained one step and reassembled equal per-subnet masked steps, slice by slice
    (running statistics too, after training-mode steps)."""
    ist, _ = make(spec, "disjoint")
    x = new_input(spec, 5, seed=2)
    mode = data.draw(modes(spec), label="mode")

    subnets = in_mode(ist.decompose(0), mode)
    slices = ist.slices(0)
    expected = {}
    for s, subnet in enumerate(subnets):
        full = masked_model(ist, slices, s, mode)
        for module in (subnet, full):
            opt = torch.optim.SGD(module.parameters(), lr=0.1)
            default_loss(module(x)).backward()
            opt.step()
        expected[s] = {n: slices.take(n, model_tensor(ist, full, n).detach(), s) for n in ist.trainable_state}
    report = ist.reassemble(subnets)
    assert sorted(report.accepted) == list(range(spec.subnets))
    for s, subnet in enumerate(subnets):
        state = subnet_state(subnet)
        for name in ist.trainable_state:
            if not slices.is_cut(name):
                continue
            got = slices.take(name, ist.state_tensor(name).detach(), s)
            assert torch.equal(got, state[name].detach())
            assert torch.allclose(got.double(), expected[s][name].double(), atol=1e-10, rtol=1e-8), name


# -- (4) interface ---------------------------------------------------------------------


@settings(max_examples=examples(50), **SETTINGS)
@given(spec=any_spec, round=st.integers(0, 3), mode=st.sampled_from(MODES))
def test_interface_batch_sizes(spec, round: int, mode: str) -> None:
    ist, _ = make(spec)
    variants = [((new_input(spec, b, seed=b),), {}) for b in (2, 3, 17)]
    check_interface(ist, variants, round, mode)


@pytest.mark.parametrize("policy", POLICIES)
def test_subnets_are_smaller_and_training_mode(policy: str) -> None:
    spec = MLPSpec(6, (24, 16), 3, True, "bn", "relu", 3, 5)
    ist, _ = make(spec, policy)
    subnets = ist.decompose(0)
    full = sum(p.numel() for p in ist.model.parameters())
    for subnet in subnets:
        assert subnet.training
        assert sum(p.numel() for p in subnet.parameters()) < full
        assert subnet.istfx_subnet.round == 0
    assert [s.istfx_subnet.index for s in subnets] == list(range(3))
