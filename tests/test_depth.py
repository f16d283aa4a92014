"""The depth pass (ResIST): residual blocks found on the graph, dealt out, skipped, scaled.

Invariants are checked as property tests on random residual MLPs and CNNs
built here (pre- and post-activation blocks, BatchNorm with and without
running statistics, LayerNorm, projection shortcuts, a layer with two
residual branches) and on the reference ResNets:

- round trip: decompose + reassemble, untrained, changes nothing bit for bit;
- coverage: each dealt-out block in exactly one subnet per round, or, with
  ``min_depth=k``, every subnet holds >= k blocks and every block >= 1;
- mask equivalence: a subnet equals the full model with the branches of the
  blocks it skips zeroed (and, with width splitting, the units it does not
  hold zeroed), in float64 and train mode; with ``depth_scaling="train"``
  the branches it holds are multiplied by 1/p;
- interface: subnets take batches of 1, 3 and 17.

The reference side never uses istfx's own scaling or dropping code: branch
outputs are zeroed or scaled by forward hooks on the module that computes
them in a copy of the model.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import examples, perturb_norms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import istfx
from istfx.errors import ISTError
from istfx.models import PreActResNet, ResNet
from istfx.testing import masked_state

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True)
ATOL, RTOL = 1e-10, 1e-8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- residual models built for the tests --------------------------------------------------


@dataclass(frozen=True)
class Spec:
    kind: str  # "mlp" | "cnn" | "layer" (two residual branches in one module)
    blocks: int  # blocks with an identity skip
    width: int  # residual stream features / channels
    hidden: int  # inside a branch
    pre: bool  # pre-activation branch (norm inside), else post-activation (ReLU after the add)
    norm: str  # "none" | "bn" (running statistics) | "bn_batch" (batch statistics) | "ln" (mlp/layer)
    projection: bool  # a shape-changing block with a projection shortcut after the first block
    subnets: int
    min_depth: int | None
    split_width: bool
    scaling: str  # "eval" | "train"
    seed: int

    @property
    def features(self) -> int:
        return 5


def _norm(kind: str, dim: int, conv: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "ln":
        return nn.LayerNorm(dim)
    bn = nn.BatchNorm2d if conv else nn.BatchNorm1d
    return bn(dim, track_running_stats=kind == "bn")


class MLPBlock(nn.Module):
    """``x + fc2(relu(fc1(relu(norm(x)))))`` (pre) or ``relu(x + norm(fc2(relu(fc1(x)))))`` (post)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, pre: bool, norm: str) -> None:
        super().__init__()
        self.pre = pre
        self.norm = _norm(norm, d_in if pre else d_out, conv=False)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.proj = nn.Linear(d_in, d_out, bias=False) if d_in != d_out else None

    def forward(self, x):
        if self.pre:
            out = self.fc2(torch.relu(self.fc1(torch.relu(self.norm(x)))))
        else:
            out = self.norm(self.fc2(torch.relu(self.fc1(x))))
        skip = self.proj(x) if self.proj is not None else x
        return skip + out if self.pre else torch.relu(skip + out)


class ConvBlock(nn.Module):
    """The same with 3x3 convolutions; a strided 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, hidden: int, pre: bool, norm: str, stride: int = 1) -> None:
        super().__init__()
        self.pre = pre
        self.norm = _norm(norm, c_in if pre else c_out, conv=True)
        self.conv1 = nn.Conv2d(c_in, hidden, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(hidden, c_out, 3, padding=1)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        if self.pre:
            out = self.conv2(torch.relu(self.conv1(torch.relu(self.norm(x)))))
        else:
            out = self.norm(self.conv2(torch.relu(self.conv1(x))))
        skip = self.proj(x) if self.proj is not None else x
        return skip + out if self.pre else torch.relu(skip + out)


class TwoBranchLayer(nn.Module):
    """A pre-norm transformer-style layer: two residual branches, one droppable unit."""

    def __init__(self, d: int, hidden: int, norm: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(norm, d, False), _norm(norm, d, False)
        self.mix = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.down(torch.tanh(self.up(self.norm2(x))))


class ResidualNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        d, h, conv = spec.width, spec.hidden, spec.kind == "cnn"
        self.stem = nn.Conv2d(1, d, 3, padding=1) if conv else nn.Linear(spec.features, d)
        blocks = []
        for i in range(spec.blocks):
            if spec.kind == "layer":
                blocks.append(TwoBranchLayer(d, h, spec.norm))
            elif conv:
                blocks.append(ConvBlock(d, d, h, spec.pre, spec.norm))
            else:
                blocks.append(MLPBlock(d, d, h, spec.pre, spec.norm))
            if i == 0 and spec.projection:
                d2 = d + 2
                blocks.append(ConvBlock(d, d2, h, spec.pre, spec.norm, stride=2) if conv
                              else MLPBlock(d, d2, h, spec.pre, spec.norm if spec.kind == "mlp" else "none"))
                d = d2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(d, 3)
        self.conv = conv

    def forward(self, x):
        out = self.blocks(self.stem(x))
        if self.conv:
            out = out.mean(dim=(2, 3))
        return self.head(out)


def build(spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed)
    model = ResidualNet(spec).double()
    perturb_norms(model)
    return model


def inputs(spec_or_kind, batch: int, seed: int = 0, side: int = 8) -> torch.Tensor:
    kind = spec_or_kind if isinstance(spec_or_kind, str) else spec_or_kind.kind
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, side, side) if kind in ("cnn", "resnet") else (batch, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@st.composite
def specs(draw) -> Spec:
    kind = draw(st.sampled_from(["mlp", "cnn", "layer"]))
    blocks = draw(st.integers(1, 4))
    # A layer's branches are grouped by the module that holds them: each branch goes through a norm.
    norms = {"mlp": ["none", "bn", "bn_batch", "ln"], "cnn": ["none", "bn", "bn_batch"],
             "layer": ["bn", "bn_batch", "ln"]}[kind]
    projection = draw(st.booleans()) if kind != "layer" else False
    subnets = draw(st.integers(1, 4))
    return Spec(
        kind=kind, blocks=blocks,
        width=draw(st.integers(4, 8)), hidden=draw(st.integers(4, 10)),
        pre=draw(st.booleans()), norm=draw(st.sampled_from(norms)), projection=projection,
        subnets=subnets, min_depth=draw(st.one_of(st.none(), st.integers(1, blocks))),
        split_width=draw(st.booleans()), scaling=draw(st.sampled_from(["eval", "train", "none"])),
        seed=draw(st.integers(0, 2**16)),
    )


def compile_spec(spec: Spec) -> istfx.ISTModel:
    return istfx.compile(build(spec), subnets=spec.subnets, example_inputs=(inputs(spec, 4),), blocks="*",
                         min_depth=spec.min_depth, width=spec.split_width, depth_scaling=spec.scaling,
                         seed=spec.seed)


# -- reference side: hooks on a copy of the model --------------------------------------------


def _fqn(path: str) -> str:
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "").replace("'", "")


def branch_ends(ist: istfx.ISTModel, block) -> list[str]:
    """Module paths of the ops that compute each branch output of `block` (from the captured graph)."""
    nodes = {n.name: n for n in ist.captured.module.graph.nodes}
    return [_fqn(list(nodes[br.output].meta["nn_module_stack"].values())[-1][0]) for br in block.branches]


def model_tensor(ist, model: nn.Module, name: str) -> torch.Tensor:
    kind = ist.plan.state_kinds[name]
    return model.get_parameter(name) if kind == "parameter" else model.get_buffer(name)


def reference(ist: istfx.ISTModel, round: int, subnet: int, held_factor: float = 1.0) -> nn.Module:
    """A train-mode copy of the full model that computes what subnet `subnet` of `round` should.

    Units the subnet does not hold are zeroed (width), branches of blocks it
    skips are multiplied by 0, branches of blocks it holds by `held_factor`.
    """
    model = copy.deepcopy(ist.model).train()
    with torch.no_grad():
        for name, value in masked_state(ist, ist.slices(round), subnet).items():
            model_tensor(ist, model, name).copy_(value)
    held = set(ist.plan.block_assignment(round)[subnet])
    for b, block in enumerate(ist.plan.blocks):
        factor = held_factor if b in held else 0.0
        for path in branch_ends(ist, block):
            model.get_submodule(path).register_forward_hook(lambda mod, args, out, f=factor: out * f)
    return model


def scaled_copy(ist: istfx.ISTModel, factor: float) -> nn.Module:
    """A copy of the full model with every dealt-out branch multiplied by `factor`."""
    model = copy.deepcopy(ist.model)
    for block in ist.plan.blocks:
        for path in branch_ends(ist, block):
            model.get_submodule(path).register_forward_hook(lambda mod, args, out, f=factor: out * f)
    return model


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_bitwise(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys(), what
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed, f"{what}: changed {changed[:6]}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=ATOL, rtol=RTOL), f"{what}: max abs error {err:.3e}"


# -- invariant checks (shared by random models and ResNets) ----------------------------------


def check_coverage(ist: istfx.ISTModel, rounds=range(3)) -> None:
    plan = ist.plan
    n, k = len(plan.blocks), plan.min_depth
    for r in rounds:
        held = plan.block_assignment(r)
        assert held == plan.block_assignment(r), "the assignment must depend only on (seed, round)"
        assert len(held) == plan.subnets
        assert all(h == sorted(set(h)) and all(0 <= b < n for b in h) for h in held)
        if k is None:
            flat = sorted(b for h in held for b in h)
            assert flat == list(range(n)), f"round {r}: {held} is not a partition of {n} blocks"
            sizes = [len(h) for h in held]
            assert max(sizes) - min(sizes) <= 1, sizes
        else:
            assert all(len(h) >= k for h in held), f"round {r}: {held} (min_depth={k})"
            assert set().union(*map(set, held)) == set(range(n)), f"round {r}: a block is in no subnet"
        # p is the average share of subnets that hold a block.
        assert plan.keep_probability == pytest.approx(sum(map(len, held)) / (n * plan.subnets))


def check_round_trip(ist: istfx.ISTModel, round: int) -> None:
    # No forward pass in between: BatchNorm in train mode updates running statistics.
    before = snapshot(ist.model)
    report = ist.reassemble(ist.decompose(round))
    assert sorted(report.accepted) == list(range(ist.plan.subnets)) and not report.rejected
    assert_bitwise(before, snapshot(ist.model), f"round trip of round {round}")


def check_skipped_blocks_absent(ist: istfx.ISTModel, subnets, round: int) -> None:
    """A skipped block's parameters are not in the subnet; a held block's are."""
    held = ist.plan.block_assignment(round)
    for s, subnet in enumerate(subnets):
        names = {n for n, _ in subnet.named_parameters()} | {n for n, _ in subnet.named_buffers()}
        for b, block in enumerate(ist.plan.blocks):
            params = [p for p in block.parameters if ist.plan.state_kinds[p] == "parameter"]
            if b in held[s]:
                assert set(params) <= names, f"subnet {s} lacks parameters of held block {block.module}"
            else:
                assert not set(params) & names, f"subnet {s} holds parameters of skipped block {block.module}"
    counts = [sum(p.numel() for p in sub.parameters()) for sub in subnets]
    assert counts == ist.subnet_parameter_counts(round)


def check_mask_equivalence(ist: istfx.ISTModel, x: torch.Tensor, round: int) -> None:
    factor = 1.0 / ist.plan.keep_probability if ist.plan.depth_scaling == "train" else 1.0
    subnets = ist.decompose(round)
    check_skipped_blocks_absent(ist, subnets, round)
    for s, subnet in enumerate(subnets):
        expected = reference(ist, round, s, factor)(x)
        assert_close(subnet(x), expected, f"subnet {s} of round {round}")


def check_batches(ist: istfx.ISTModel, make, sizes=(1, 3, 17), round: int = 0) -> None:
    for subnet in ist.decompose(round):
        for b in sizes:
            out = subnet(make(b))
            assert out.shape == (b, ist.model.head.out_features if hasattr(ist.model, "head")
                                 else ist.model.fc.out_features)
            assert torch.isfinite(out).all()


def check_inference_scaling(ist: istfx.ISTModel, x: torch.Tensor) -> None:
    """Inside the context the full model runs branches times p ('eval') or unchanged; exit restores exactly."""
    before = snapshot(ist.model)
    factor = ist.plan.keep_probability if ist.plan.depth_scaling == "eval" else 1.0
    expected = scaled_copy(ist, factor).eval()(x)
    with ist.inference_scaling() as model:
        assert model is ist.model
        model.eval()
        assert_close(model(x), expected, "full model under inference_scaling")
        if factor == 1.0:
            assert_bitwise(before, snapshot(ist.model), "inference_scaling with nothing to fold")
    ist.model.train()
    assert_bitwise(before, snapshot(ist.model), "parameters after inference_scaling")


# -- property tests on random residual networks -------------------------------------------------


@settings(max_examples=examples(10), **SETTINGS)
@given(spec=specs(), round=st.integers(0, 5))
def test_invariants_random_residual_nets(spec: Spec, round: int):
    ist = compile_spec(spec)
    plan = ist.plan
    expected_blocks = [f"blocks.{i + (1 if spec.projection and i > 0 else 0)}" for i in range(spec.blocks)]
    assert [b.module for b in plan.blocks] == expected_blocks
    assert [b.module for b in plan.shared_blocks] == (["blocks.1"] if spec.projection else [])
    if spec.kind == "layer":
        assert all(len(b.branches) == 2 for b in plan.blocks), "a layer's two branches form one unit"
    check_coverage(ist)
    check_round_trip(ist, round)
    x = inputs(spec, 6, seed=round)
    check_mask_equivalence(ist, x, round)
    sizes = (3, 17) if spec.kind != "cnn" and spec.norm.startswith("bn") else (1, 3, 17)
    check_batches(ist, lambda b: inputs(spec, b, seed=b), sizes, round)
    check_inference_scaling(ist, x)


# -- the reference ResNets ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def resnet_ist(cls_name: str, depth: int = 18, subnets: int = 2, **options) -> istfx.ISTModel:
    """A compiled width-4 ResNet in float64 (cached: capture is the slow part)."""
    cls = {"PreActResNet": PreActResNet, "ResNet": ResNet}[cls_name]
    torch.manual_seed(depth + subnets)
    model = cls(depth, num_classes=10, in_channels=1, width=4).double()
    perturb_norms(model)
    options.setdefault("blocks", "*")
    return istfx.compile(model, subnets=subnets, example_inputs=(inputs("resnet", 2),), **options)


RESNET_CONFIGS = [
    ("PreActResNet", 18, 2, dict(width=False)),
    ("ResNet", 18, 4, dict(width=False, min_depth=2, depth_scaling="train")),
    # width and depth together; image sides dynamic (test_resnet_selection_and_batches runs 16 px images)
    ("PreActResNet", 18, 3, dict(width=True, blocks="layer[14].*", dynamic="all")),
    ("ResNet", 18, 2, dict(width=False, shortcut_blocks="drop")),  # ResIST's naive decomposition
]
DROPPABLE = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
STRIDED = ["layer2.0", "layer3.0", "layer4.0"]


def _resnet(config) -> istfx.ISTModel:
    cls_name, depth, subnets, options = config
    return resnet_ist(cls_name, depth, subnets, **options)


@pytest.mark.parametrize("config", [0, 1], ids=["PreActResNet", "ResNet"])
def test_resnet18_blocks(config):
    ist = _resnet(RESNET_CONFIGS[config])
    plan = ist.plan
    assert [b.module for b in plan.blocks] == DROPPABLE
    assert [b.module for b in plan.shared_blocks] == STRIDED
    assert all(not b.droppable and "shortcut is not the identity" in b.reason for b in plan.shared_blocks)
    info = {b["module"]: b for b in plan.to_dict()["blocks"]}
    assert [m for m, b in info.items() if b["droppable"]] == DROPPABLE
    assert all("shortcut" in info[m]["reason"] for m in STRIDED)
    params = info["layer1.1"]["parameters"]
    assert params and all(p.startswith("layer1.1.") for p in params)
    last = "conv2.weight" if config == 0 else "bn2.weight"
    assert "layer1.1." + last in params and "layer1.1.conv1.weight" in params
    text = str(plan)
    assert "drop  layer1.0" in text and "keep  layer2.0: shortcut is not the identity" in text


def test_naive_decomposition_deals_out_strided_blocks():
    ist = _resnet(RESNET_CONFIGS[3])
    assert sorted(b.module for b in ist.plan.blocks) == sorted(DROPPABLE + STRIDED)
    assert ist.plan.shared_blocks == []
    # A skipped strided block keeps its projection shortcut: the subnet still changes shape there.
    held = ist.plan.block_assignment(0)
    strided = [b for b, block in enumerate(ist.plan.blocks) if block.module in STRIDED]
    s = next(s for s in range(2) if any(b not in held[s] for b in strided))
    names = {n for n, _ in ist.decompose(0)[s].named_parameters()}
    skipped = next(ist.plan.blocks[b].module for b in strided if b not in held[s])
    assert f"{skipped}.shortcut.0.weight" in names and f"{skipped}.conv1.weight" not in names


def test_bottleneck_blocks():
    ist = resnet_ist("PreActResNet", 50, 4, width=False)
    assert [b.module for b in ist.plan.shared_blocks] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert [b.module for b in ist.plan.blocks] == [f"layer{i}.{j}" for i, n in ((1, 3), (2, 4), (3, 6), (4, 3))
                                                   for j in range(1, n)]
    sub = ist.decompose(0)[0]
    assert sum(p.numel() for p in sub.parameters()) < ist.plan.parameters_full


@settings(max_examples=examples(6), **SETTINGS)
@given(config=st.sampled_from(RESNET_CONFIGS), round=st.integers(0, 7))
def test_invariants_resnets(config, round):
    ist = _resnet(config)
    check_coverage(ist, rounds=[round])
    check_round_trip(ist, round)
    check_mask_equivalence(ist, inputs("resnet", 3, seed=round), round)


def test_resnet_selection_and_batches():
    ist = _resnet(RESNET_CONFIGS[2])
    assert [b.module for b in ist.plan.blocks] == ["layer1.0", "layer1.1", "layer4.1"]
    assert {b.module for b in ist.plan.shared_blocks} == {"layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                                          "layer4.0"}
    assert ist.plan.split, "width splitting stays on"
    # 16x16 images: BatchNorm in train mode sees more than one value per channel even for batch 1.
    check_batches(ist, lambda b: inputs("resnet", b, seed=b, side=16))


def test_min_depth_overlap_and_averaging():
    ist = _resnet(RESNET_CONFIGS[1])  # 5 blocks, 4 subnets, min_depth=2, depth only
    held = ist.plan.block_assignment(0)
    assert all(len(h) >= 2 for h in held) and sum(map(len, held)) > 5
    assert ist.plan.keep_probability == pytest.approx(2 / 5)
    # Blocks held by several subnets are averaged on reassembly.
    subnets = ist.decompose(0)
    holders = {b: [s for s, h in enumerate(held) if b in h] for b in range(5)}
    b, owners = next((b, o) for b, o in holders.items() if len(o) >= 2)
    name = ist.plan.blocks[b].module + ".conv1.weight"
    before = ist.state_tensor(name).detach().clone()
    with torch.no_grad():
        for k, s in enumerate(owners):
            subnets[s].get_parameter(name).add_(float(k + 1))
    ist.reassemble(subnets)
    expected = before + sum(range(1, len(owners) + 1)) / len(owners)
    try:
        assert_close(ist.state_tensor(name).detach(), expected, f"{name} averaged over {owners}")
    finally:
        with torch.no_grad():
            ist.state_tensor(name).copy_(before)


def test_train_scaling_hand_computed():
    """depth_scaling='train': the kept branch of a subnet is multiplied by 1/p, written out by hand."""
    spec = Spec("mlp", 2, 4, 6, True, "none", False, 2, None, False, "train", 0)
    model = build(spec)
    ist = istfx.compile(model, subnets=2, example_inputs=(inputs(spec, 4),), blocks="*", width=False,
                        depth_scaling="train")
    p = ist.plan.keep_probability
    assert p == 0.5
    x = inputs(spec, 5, seed=3)
    held = ist.plan.block_assignment(0)
    for s, subnet in enumerate(ist.decompose(0)):
        h = model.stem(x)
        for b, block in enumerate(model.blocks):
            if b in held[s]:
                h = h + block.fc2(torch.relu(block.fc1(torch.relu(h)))) / p
        assert_close(subnet(x), model.head(h), f"subnet {s}")
    # The full model needs no scaling: inference_scaling and finalize leave it as it is.
    before = snapshot(model)
    with ist.inference_scaling():
        assert_bitwise(before, snapshot(model), "inference_scaling under depth_scaling='train'")
    assert ist.finalize() is model
    assert_bitwise(before, snapshot(model), "finalize under depth_scaling='train'")


@pytest.mark.parametrize("config", [0, 1, 3], ids=["PreActResNet", "ResNet-train", "ResNet-naive"])
def test_inference_scaling(config):
    check_inference_scaling(_resnet(RESNET_CONFIGS[config]), inputs("resnet", 4, seed=11))


@pytest.mark.parametrize("config", [0, 3], ids=["PreActResNet", "ResNet-naive"])
def test_finalize(config):
    """finalize folds p into the last linear op of every dealt-out branch, once and for good."""
    ist = _resnet(RESNET_CONFIGS[config])
    x = inputs("resnet", 4, seed=11)
    p = ist.plan.keep_probability
    before = snapshot(ist.model)
    expected = scaled_copy(ist, p).eval()(x)
    model = ist.finalize()
    try:
        assert model is ist.model
        after = snapshot(model)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        last = ("conv2.weight",) if config == 0 else ("bn2.weight", "bn2.bias")
        dealt = {b.module for b in ist.plan.blocks}
        assert {k.rsplit(".", 2)[0] for k in changed} == dealt
        assert all(k.endswith(last) for k in changed), changed
        for k in changed:
            assert torch.allclose(after[k], before[k] * p, rtol=0, atol=0)
        assert_close(model.eval()(x), expected, "finalized model")
    finally:
        model.load_state_dict(before)
        model.train()


def test_fit_evaluates_with_scaling():
    """istfx.fit trains depth-only subnets and evaluates the p-scaled full model."""
    from torch.utils.data import DataLoader, TensorDataset

    spec = Spec("cnn", 3, 4, 4, True, "bn", False, 2, None, False, "eval", 1)
    model = build(spec).float()
    x = inputs(spec, 32, seed=5).float()
    y = torch.arange(32) % 3
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    ist = istfx.compile(model, subnets=2, example_inputs=(x[:4],), blocks="*", width=False)
    history = istfx.fit(ist, data, rounds=2, local_steps=2, eval_data=data, progress=False,
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05))
    assert len(history) == 2 and history[-1]["eval_accuracy"] is not None
    counts = history[-1]["parameters_per_subnet"]
    assert max(counts) < sum(p.numel() for p in model.parameters())


# -- bad input ----------------------------------------------------------------------------


# Three identity blocks (blocks.0, blocks.2, blocks.3) and a projection block (blocks.1).
SMALL = Spec("mlp", 3, 6, 6, True, "none", True, 2, None, True, "eval", 0)


def _compile_small(**options):
    return istfx.compile(build(SMALL), subnets=2, example_inputs=(inputs(SMALL, 4),), **options)


def test_min_depth_larger_than_blocks():
    with pytest.raises(ISTError, match=r"min_depth=4 .*3 droppable blocks"):
        _compile_small(blocks="*", min_depth=4)


def test_fewer_blocks_than_subnets_is_warned_unless_min_depth():
    model = build(SMALL)  # 3 droppable blocks
    with pytest.warns(UserWarning, match=r"3 residual blocks dealt out among 4 subnets: 1 subnets hold none.*min_depth=1"):
        istfx.compile(model, subnets=4, example_inputs=(inputs(SMALL, 4),), blocks="*", width=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ist = istfx.compile(model, subnets=4, example_inputs=(inputs(SMALL, 4),), blocks="*", width=False,
                            min_depth=1)
    assert all(len(held) >= 1 for held in ist.plan.block_assignment(0))


def test_min_depth_without_blocks():
    with pytest.raises(ISTError, match=r"min_depth needs the depth pass.*blocks="):
        _compile_small(min_depth=1)


def test_glob_matching_nothing_lists_blocks():
    with pytest.raises(ISTError) as info:
        _compile_small(blocks="layer3.*")
    message = str(info.value)
    assert "'layer3.*' matches no droppable residual block" in message
    assert "blocks.0, blocks.2, blocks.3" in message


def test_glob_naming_only_a_shared_block():
    with pytest.raises(ISTError, match="matches no droppable"):
        _compile_small(blocks="blocks.1")  # the projection block


def test_depth_on_a_model_without_residual_blocks():
    mlp = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ISTError, match="no residual block with an identity skip"):
        istfx.compile(mlp, subnets=2, example_inputs=(torch.randn(4, 5),), blocks="*")


def test_depth_off_and_width_off():
    with pytest.raises(ISTError, match="nothing would be split"):
        _compile_small(width=False)


@pytest.mark.parametrize("options, pattern", [
    (dict(depth_scaling="test"), "depth_scaling must be"),
    (dict(shortcut_blocks="keep"), "shortcut_blocks must be"),
    (dict(min_depth=0), "min_depth=0"),
])
def test_bad_depth_options(options, pattern):
    with pytest.raises(ISTError, match=pattern):
        _compile_small(blocks="*", **options)


# -- command line ---------------------------------------------------------------------------

MODEL_FILE = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.layers = nn.Sequential(Block(), Block(), Block())
    def forward(self, x):
        return self.head(self.layers(self.stem(x)))

model = Net()
example_inputs = (torch.randn(4, 4),)
"""


def _cli(*argv) -> tuple[int, str, str]:
    from istfx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_inspect_blocks(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    code, out, err = _cli("inspect", str(path), "--subnets", "2", "--blocks", "layers.*", "--min-depth", "2",
                          "--no-width", "--depth-scaling", "train", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [b["module"] for b in report["blocks"]] == ["layers.0", "layers.1", "layers.2"]
    assert report["min_depth"] == 2 and report["depth_scaling"] == "train"
    assert not any(g["split"] for g in report["groups"])
    code, out, err = _cli("inspect", str(path), "--subnets", "2", "--blocks", "*")
    assert code == 0 and "drop  layers.1" in out
    code, out, err = _cli("inspect", str(path), "--blocks", "nope.*")
    assert code == 2 and "layers.0, layers.1, layers.2" in err


def test_group_blocks_merges_a_layers_branches() -> None:
    """group_blocks=glob: both residual branches of one layer become one droppable unit."""

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(x)
            return x + self.down(torch.relu(self.up(x)))

    model = nn.Sequential(nn.Linear(4, 8), Layer(), Layer(), nn.Linear(8, 2))
    x = torch.randn(4, 4)
    ungrouped = istfx.compile(model, 2, example_inputs=(x,), blocks="*", width=False)
    assert [b.module for b in ungrouped.plan.blocks] == ["1.attn", "1", "2.attn", "2"]
    grouped = istfx.compile(model, 2, example_inputs=(x,), blocks="*", width=False, group_blocks="*")
    assert [b.module for b in grouped.plan.blocks] == ["1", "2"]
    assert all(len(b.branches) == 2 for b in grouped.plan.blocks)
    for sub, held in zip(grouped.decompose(0), grouped.plan.block_assignment(0)):
        names = {n for n, _ in sub.named_parameters()}
        for b, block in enumerate(grouped.plan.blocks):
            assert all((p in names) == (b in held) for p in block.parameters)


def test_skipped_block_takes_its_batch_norm_counter() -> None:
    """A skipped block's in-place state updates (num_batches_tracked) leave the subnet with it."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(torch.relu(self.bn(x)))

    model = nn.Sequential(nn.Linear(4, 8), Block(), Block(), nn.Linear(8, 2))
    ist = istfx.compile(model, 2, example_inputs=(torch.randn(4, 4),), blocks="*", width=False)
    for sub, held in zip(ist.decompose(0), ist.plan.block_assignment(0)):
        buffers = {n for n, _ in sub.named_buffers()}
        for b, block in enumerate(ist.plan.blocks):
            assert (f"{block.module}.bn.num_batches_tracked" in buffers) == (b in held)


# -- in-place residual adds (torchvision's ResNet blocks, ResIST's PreActBlock) ----------------------


class TorchvisionBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, rebuilt: ``out += identity`` after bn2, in-place ReLUs."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck, rebuilt (1x1 -> 3x3 -> 1x1, ``out += identity``)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, planes * 2, 1, bias=False), nn.BatchNorm2d(planes * 2)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 2:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 2, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 2))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResISTPreActBlock(nn.Module):
    """The ResIST authors' PreActBlock: shortcut taken after the first BN-ReLU, ``out += shortcut``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out += shortcut
        return out


class InplaceNet(nn.Module):
    """stem -> [block(4, 4), block(4, 6, stride 2), block(6, 6)] -> pool -> fc."""

    def __init__(self, block: type, channels: int = 4) -> None:
        super().__init__()
        expansion = 2 if block is TorchvisionBottleneck else 1
        self.stem = nn.Conv2d(1, channels * expansion, 3, padding=1)
        c = channels * expansion
        self.layer = nn.Sequential(block(c, channels), block(channels * expansion, channels + 2, stride=2),
                                   block((channels + 2) * expansion, channels + 2))
        self.fc = nn.Linear((channels + 2) * expansion, 3)

    def forward(self, x):
        return self.fc(self.layer(self.stem(x)).mean(dim=(2, 3)))


INPLACE_BLOCKS = {"BasicBlock": (TorchvisionBasicBlock, ("bn2.weight", "bn2.bias")),
                  "Bottleneck": (TorchvisionBottleneck, ("bn3.weight", "bn3.bias")),
                  "PreActBlock": (ResISTPreActBlock, ("conv2.weight",))}


@pytest.mark.parametrize("name", list(INPLACE_BLOCKS))
def test_inplace_residual_adds_are_blocks(name):
    """``out += identity`` (aten.add_) is a residual add: its blocks are found, dropped and scaled exactly."""
    block, carriers = INPLACE_BLOCKS[name]
    torch.manual_seed(0)
    model = InplaceNet(block).double()
    perturb_norms(model)
    ist = istfx.compile(model, subnets=2, example_inputs=(inputs("resnet", 4),), blocks="*", width=True)
    adds = {n.name for n in ist.captured.module.graph.nodes if n.target is torch.ops.aten.add_.Tensor}
    assert adds, "the capture keeps the in-place add"
    assert [b.module for b in ist.plan.blocks] == ["layer.0", "layer.2"]
    assert [b.module for b in ist.plan.shared_blocks] == ["layer.1"]
    assert {br.add for b in ist.plan.blocks for br in b.branches} <= adds
    assert sorted(ist._fold_targets) == sorted(f"layer.{i}.{c}" for i in (0, 2) for c in carriers)
    for round in (0, 1):
        check_round_trip(ist, round)
        check_mask_equivalence(ist, inputs("resnet", 3, seed=round), round)
    check_inference_scaling(ist, inputs("resnet", 4, seed=7))


def test_inplace_add_onto_the_skip():
    """``x += f(x)``: the skip itself is updated in place; dropping the branch leaves x."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            x = x.clone()
            x += self.fc2(torch.relu(self.fc1(x)))
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Block(), Block(), nn.Linear(6, 3)).double()
    ist = istfx.compile(model, subnets=2, example_inputs=(inputs("mlp", 4),), blocks="*", width=False)
    assert [b.module for b in ist.plan.blocks] == ["1", "2"]
    x = inputs("mlp", 5, seed=1)
    held = ist.plan.block_assignment(0)
    for s, subnet in enumerate(ist.decompose(0)):
        h = model[0](x)
        for b in (1, 2):
            if b - 1 in held[s]:
                h = h + model[b].fc2(torch.relu(model[b].fc1(h)))
        assert_close(subnet(x), model[3](h), f"subnet {s}")


# -- scaled residual branches: x + c * f(x), LayerScale, drop-path -----------------------------------


class LayerScale(nn.Module):
    """timm's LayerScale: ``x * gamma`` (``x.mul_(gamma)`` in place when asked)."""

    def __init__(self, dim: int, init: float = 0.1, inplace: bool = False, conv: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init * torch.linspace(0.5, 1.5, dim).reshape((dim, 1, 1) if conv else (dim,)))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


def drop_path_timm(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """timm's drop_path: ``x.div(keep) * bernoulli mask`` per sample in training, the identity in eval."""
    if rate == 0.0 or not training:
        return x
    keep = 1 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x.div(keep) * mask


def stochastic_depth_torchvision(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """torchvision.ops.stochastic_depth(mode='row'): noise drawn in place, ``noise.div_`` unassigned."""
    if not training or rate == 0.0:
        return x
    survival = 1.0 - rate
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    noise = noise.bernoulli_(survival)
    noise.div_(survival)
    return x * noise


class DropPath(nn.Module):
    def __init__(self, rate: float, style: str = "timm") -> None:
        super().__init__()
        self.rate, self.style = rate, style

    def forward(self, x):
        fn = drop_path_timm if self.style == "timm" else stochastic_depth_torchvision
        return fn(x, self.rate, self.training)


class ScaledBlock(nn.Module):
    """``x + scale(f(x))`` with ``scale`` one of the patterns of public zoos.

    ``factor`` (a Python float, 1 at capture) multiplies the branch output in
    the reference copies of the tests (0 removes the branch); it adds no node
    to the captured graph.
    """

    def __init__(self, d: int, kind: str, rate: float = 0.0) -> None:
        super().__init__()
        self.kind, self.factor = kind, 1.0
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ls = LayerScale(d, inplace=kind == "layerscale_inplace")
        self.drop_path = DropPath(rate, "torchvision" if kind == "stochastic_depth" else "timm")

    def forward(self, x):
        if self.factor == 0.0:  # the branch is not computed at all: no drop-path draw either
            return x
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))  # ends in a ReLU: the walk goes through it
        if self.kind == "const":
            out = 0.5 * h
        elif self.kind == "const_div":
            out = h / 4
        elif self.kind in ("layerscale", "layerscale_inplace"):
            out = self.drop_path(self.ls(h))
        else:  # drop-path alone
            out = self.drop_path(h)
        if self.factor != 1.0:
            out = out * self.factor
        return x + out


SCALED_KINDS = {"const": "fc2", "const_div": "fc2", "layerscale": "ls.gamma", "layerscale_inplace": "ls.gamma",
                "drop_path": "fc2", "stochastic_depth": "fc2"}


def _scaled_model(kind: str, rate: float) -> nn.Module:
    torch.manual_seed(3)
    blocks = [ScaledBlock(6, kind, rate) for _ in range(3)]
    return nn.Sequential(nn.Linear(5, 6), *blocks, nn.Linear(6, 3)).double()


def _with_factors(model: nn.Module, factors: dict[int, float]) -> nn.Module:
    copy_ = copy.deepcopy(model)
    for i, f in factors.items():
        copy_[i].factor = f
    return copy_


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("kind", list(SCALED_KINDS))
def test_scaled_branches_carry_the_evaluation_scale(kind, rate):
    """x + c*f(x), LayerScale and drop-path branches: blocks found, eval scale folded into gamma or fc2, exactly."""
    model = _scaled_model(kind, rate)
    ist = istfx.compile(model, subnets=3, example_inputs=(inputs("mlp", 4),), blocks="*", width=False)
    assert [b.module for b in ist.plan.blocks] == ["1", "2", "3"]
    carrier = SCALED_KINDS[kind]
    suffixes = ("",) if carrier.endswith("gamma") else (".weight", ".bias")
    assert sorted(ist._fold_targets) == sorted(f"{i}.{carrier}{s}" for i in (1, 2, 3) for s in suffixes)
    p = ist.plan.keep_probability
    x = inputs("mlp", 6, seed=2)
    before = snapshot(model)
    expected_out = _with_factors(model, {i: p for i in (1, 2, 3)}).eval()(x)
    with ist.inference_scaling() as scaled:
        assert_close(scaled.eval()(x), expected_out, "eval-time scaling equals scaling the branch output")
    model.train()
    assert_bitwise(before, snapshot(model), "parameters after inference_scaling")
    # A skipped block equals the full model without its branch (training mode). The subnet draws no
    # drop-path mask for a block it skips, so with equal seeds the masks of the blocks it holds are equal.
    for round in (0, 1):
        held = ist.plan.block_assignment(round)
        for s, subnet in enumerate(ist.decompose(round)):
            reference = _with_factors(model, {i: (1.0 if i - 1 in held[s] else 0.0) for i in (1, 2, 3)}).train()
            torch.manual_seed(round)
            got = subnet(x)
            torch.manual_seed(round)
            assert_close(got, reference(x), f"{kind}: subnet {s} of round {round}")
        check_round_trip(ist, round)


def test_drop_path_subnet_draws_like_the_model():
    """With every block held (min_depth = all), a drop-path subnet draws the model's masks: equal outputs."""
    model = _scaled_model("layerscale", 0.5)
    ist = istfx.compile(model, subnets=2, example_inputs=(inputs("mlp", 4),), blocks="*", width=True, min_depth=3)
    x = inputs("mlp", 16, seed=4)
    slices = ist.slices(0)
    for s, subnet in enumerate(ist.decompose(0)):
        reference = copy.deepcopy(model).train()
        with torch.no_grad():
            for name, value in masked_state(ist, slices, s).items():
                model_tensor(ist, reference, name).copy_(value)
        torch.manual_seed(9)
        got = subnet(x)
        torch.manual_seed(9)
        want = reference(x)
        assert_close(got, want, f"subnet {s}")
        torch.manual_seed(10)
        assert not torch.allclose(subnet(x), got), "the masks are random"


def test_train_scaling_of_a_layerscale_branch_hand_computed():
    """depth_scaling='train' on x + gamma * f(x): held branches times 1/p, written out by hand."""
    model = _scaled_model("layerscale", 0.0)
    ist = istfx.compile(model, subnets=3, example_inputs=(inputs("mlp", 4),), blocks="*", width=False,
                        depth_scaling="train")
    p = ist.plan.keep_probability
    x = inputs("mlp", 5, seed=3)
    held = ist.plan.block_assignment(2)
    for s, subnet in enumerate(ist.decompose(2)):
        h = model[0](x)
        for i in (1, 2, 3):
            if i - 1 in held[s]:
                blk = model[i]
                h = h + blk.ls.gamma * torch.relu(blk.fc2(torch.relu(blk.fc1(h)))) / p
        assert_close(subnet(x), model[4](h), f"subnet {s}")


def test_branch_without_a_carrier_names_block_and_op():
    """A branch ending in tanh has no parameter to carry p: the error names the block, the op and the line."""

    class Root(nn.Module):  # the residual add sits in the model's own forward: the block is the root
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return x + torch.tanh(self.fc(x))

    with pytest.raises(ISTError) as info:
        istfx.compile(Root(), subnets=1, example_inputs=(torch.randn(4, 6),), blocks="*", width=False)
    message = str(info.value)
    assert message.startswith("block <root> (")
    assert "return x + torch.tanh(self.fc(x))" in message
    assert "tanh" in message and "depth_scaling='train'" in message
    ist = istfx.compile(Root(), subnets=1, example_inputs=(torch.randn(4, 6),), blocks="*", width=False,
                        depth_scaling="train")
    assert [b.name for b in ist.plan.blocks][0].startswith("<root> (")


def test_a_factor_computed_from_the_carrier_is_refused():
    """x + f(x) * f(x).mean(): scaling fc's parameters by p scales the output by p^2, so fc is no carrier."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            h = self.fc(x)
            return x + h * h.mean(dim=-1, keepdim=True)

    model = nn.Sequential(Block(), Block())
    with pytest.raises(ISTError, match=r"block 0: .*a factor of its branch output is computed from linear"):
        istfx.compile(model, subnets=1, example_inputs=(torch.randn(4, 6),), blocks="*", width=False)


def test_parallel_branches_carry_the_scale_in_both_paths():
    """GPT-NeoX/Falcon's parallel layer ``x + (mlp(x) + attn(x))``, a weight read as ``w.T``: both paths carry p."""

    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = 1.0
            self.norm = nn.LayerNorm(6)
            self.a = nn.Linear(6, 6)
            self.up = nn.Linear(6, 10)
            self.w_out = nn.Parameter(torch.randn(6, 10) / 3)

        def forward(self, x):
            h = self.norm(x)
            branch = torch.relu(self.up(h)) @ self.w_out.T + self.a(h)
            return x + branch * self.factor if self.factor != 1.0 else x + branch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Parallel(), Parallel(), nn.Linear(6, 3)).double()
    ist = istfx.compile(model, subnets=2, example_inputs=(inputs("mlp", 4),), blocks="*", width=True)
    assert [b.module for b in ist.plan.blocks] == ["1", "2"]
    assert sorted(ist._fold_targets) == sorted(f"{i}.{t}" for i in (1, 2) for t in ("a.weight", "a.bias", "w_out"))
    x = inputs("mlp", 5, seed=1)
    expected_model = copy.deepcopy(model)
    for i in (1, 2):
        expected_model[i].factor = ist.plan.keep_probability
    with ist.inference_scaling() as scaled:
        assert_close(scaled(x), expected_model(x), "parallel branches scaled by p")


def test_a_carrier_feeding_another_is_refused():
    """x + fc2(fc1(x)) + fc1(x): scaling both linear ops scales the first path by p^2, so nothing carries p."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = self.fc1(x)
            return x + (self.fc2(h) + h)

    with pytest.raises(ISTError, match=r"block 0: .*computed from linear \(in module 0.fc1, "):
        istfx.compile(nn.Sequential(Block(), Block()), subnets=1, example_inputs=(torch.randn(4, 6),), blocks="*",
                      width=False)
