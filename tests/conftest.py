"""Shared checks of the IST invariants, which every model the project claims must keep.

The invariants (README.md, "What gets split", says which groups are exact):

1. round trip: reassembling decomposed, untrained subnets changes nothing;
2. coverage: under ``disjoint`` every unit of a split group is in one subnet per round;
3. mask equivalence: for an exact group, a subnet equals the full model with the
   units it does not hold zeroed (float64, tight tolerance), also after one SGD
   step; a skipped residual block equals the full model with that branch zeroed;
4. interface: a subnet takes any batch size and returns the model's output
   structure, in training and in evaluation mode;
5. backends agree: the same plan, data and seed train the same model under every
   backend and topology (checked in tests/test_distributed.py).

The helpers take a compiled :class:`istfx.ISTModel` and the inputs to call it
with, as ``(args, kwargs)``, and assert one invariant each:

- :func:`check_round_trip`: decompose then reassemble, untrained, changes no
  parameter or buffer, bit for bit;
- :func:`check_coverage`: under a disjoint policy every unit of every split
  group lies in exactly one subnet per round, sizes differ by at most one, and
  the assignment only depends on ``(seed, round)``;
- :func:`check_forward_equivalence` / :func:`check_sgd_step`: a subnet equals
  the full model with the other units zeroed, before and after one SGD step,
  and reassembly writes its state back into its slices;
- :func:`check_interface`: subnets take other batch sizes and return the
  model's output structure and shapes.

The forward, SGD-step and interface checks take ``mode="train"`` or
``"eval"``: subnets and the masked model then run in that mode (evaluation:
dropout off, batch norm on running statistics, no buffer updates).

Test modules import them with ``from conftest import ...``.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

import istfx
from istfx.testing import held_mask, masked_state

Inputs = tuple[tuple, dict]

# The test models are tiny: intra-op threads only add synchronisation, and on a shared 2-core machine a
# second thread that has to wait for a core makes every op slow (test_models + test_training under
# load: 33 s with two threads, 9 s with one).
torch.set_num_threads(int(os.environ.get("ISTFX_TEST_THREADS", "1")))

# float64 throughout: the tolerance only has to absorb summation order.
ATOL = 1e-10
RTOL = 1e-8


def examples(n: int) -> int:
    """Hypothesis example count: `n` (what CI runs), scaled by ``ISTFX_PROPERTY_SCALE`` and raised to at least
    ``ISTFX_PROPERTY_MIN`` (the long run of the README: ``ISTFX_PROPERTY_MIN=200``)."""
    scaled = round(n * float(os.environ.get("ISTFX_PROPERTY_SCALE", "1")))
    return max(1, scaled, int(os.environ.get("ISTFX_PROPERTY_MIN", "0")))


# -- state ---------------------------------------------------------------------



def perturb_norms(model: nn.Module) -> nn.Module:
    """Non-trivial norm affine parameters and running statistics (defaults are 1 and 0), so misplaced units show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model

def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module`, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_bitwise_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], what: str = "") -> None:
    assert before.keys() == after.keys(), what
    changed = [
        k for k in before
        if before[k].shape != after[k].shape or before[k].dtype != after[k].dtype
        or not torch.equal(before[k], after[k])
    ]
    assert not changed, f"{what}: changed {changed[:8]}"


def subnet_state(subnet: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(subnet.named_parameters())
    state.update(subnet.named_buffers())
    return state


def model_tensor(ist: istfx.ISTModel, module: nn.Module, name: str) -> torch.Tensor:
    """The tensor of `module` (a copy of ``ist.model``) behind captured name `name`."""
    kind = ist.plan.state_kinds[name]
    return module.get_parameter(name) if kind == "parameter" else module.get_buffer(name)


MODES = ("train", "eval")


def masked_model(ist: istfx.ISTModel, slices, subnet: int, mode: str = "train") -> nn.Module:
    """A copy of the model, in `mode`, with the units `subnet` does not hold zeroed."""
    assert mode in MODES, mode
    model = copy.deepcopy(ist.model)
    with torch.no_grad():
        for name, value in masked_state(ist, slices, subnet).items():
            model_tensor(ist, model, name).copy_(value)
    return model.train(mode == "train")


def in_mode(subnets: list[nn.Module], mode: str) -> list[nn.Module]:
    """`subnets`, each switched to `mode` (decompose returns them in training mode)."""
    assert mode in MODES, mode
    for subnet in subnets:
        assert subnet.training
        subnet.train(mode == "train")
    return subnets


# -- outputs -------------------------------------------------------------------


def leaves(output: Any) -> tuple[list[Any], Any]:
    return pytree.tree_flatten(output)


def tensor_leaves(output: Any) -> list[torch.Tensor]:
    return [x for x in leaves(output)[0] if isinstance(x, torch.Tensor)]


def pick(output: Any, key: str | None) -> Any:
    """`output[key]` for Hugging Face outputs (logits, last_hidden_state), else the output."""
    if key is None:
        return output
    return getattr(output, key) if hasattr(output, key) else output[key]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=RTOL), f"{what}: max abs error {err:.3e}"


def call(module: nn.Module, inputs: Inputs) -> Any:
    args, kwargs = inputs
    return module(*args, **kwargs)


def default_loss(output: Any) -> torch.Tensor:
    """A loss on every floating output, with fixed random weights (no symmetric gradients)."""
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in tensor_leaves(output):
        if t.is_floating_point():
            w = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            total = total + (t * w).mean() + (t * t).mean()
    return total


# -- invariants ----------------------------------------------------------------


def check_round_trip(ist: istfx.ISTModel, round: int) -> None:
    """(1) decompose(round) + reassemble(all subnets), untrained: no tensor changes, bit for bit."""
    before = snapshot(ist.model)
    subnets = ist.decompose(round)
    report = ist.reassemble(subnets)
    assert sorted(report.accepted) == list(range(ist.plan.subnets))
    assert report.rejected == {} and report.missing == []
    assert report.round == round
    assert_bitwise_equal(before, snapshot(ist.model), f"round trip of round {round}")


def check_coverage(ist: istfx.ISTModel, twin: istfx.ISTModel, rounds=range(4)) -> None:
    """(2) partition per round, near-equal sizes, reproducible from the seed, changing across rounds.

    `twin` is the same model compiled separately with the same seed.
    """
    plan = ist.plan
    assert plan.policy.disjoint
    assert plan.split, "nothing split"
    assert twin.plan.split == plan.split
    assignments = []
    for r in rounds:
        assignment = plan.assignment(r)
        assert sorted(assignment) == sorted(plan.split)
        for gid, parts in assignment.items():
            units = plan.groups[gid].units
            assert len(parts) == plan.subnets
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1, f"group {gid} round {r}: sizes {sizes}"
            assert sizes == plan.counts(plan.groups[gid])
            union = torch.cat(list(parts))
            assert union.dtype == torch.long
            assert sorted(union.tolist()) == list(range(units)), f"group {gid} round {r}: not a partition"
        # Every process derives the same assignment from (seed, round).
        again = twin.plan.assignment(r)
        assert again.keys() == assignment.keys()
        for gid in assignment:
            assert all(torch.equal(a, b) for a, b in zip(assignment[gid], again[gid])), (gid, r)
        assignments.append(assignment)
    if plan.subnets > 1 and len(assignments) > 1:
        first = assignments[0]
        same = [
            all(all(torch.equal(a, b) for a, b in zip(first[g], other[g])) for g in first)
            for other in assignments[1:]
        ]
        assert not all(same), "the assignment never changes across rounds"


def check_forward_equivalence(
    ist: istfx.ISTModel, inputs: Inputs, round: int, key: str | None = None, atol: float = ATOL,
    mode: str = "train",
) -> None:
    """(3) every subnet's output equals the masked full model's, both in `mode`.

    In evaluation mode the subnet's buffers must not change either.
    """
    subnets = in_mode(ist.decompose(round), mode)
    slices = ist.slices(round)
    for s, subnet in enumerate(subnets):
        expected = pick(call(masked_model(ist, slices, s, mode), inputs), key)
        buffers = {k: v.clone() for k, v in subnet.named_buffers()}
        actual = pick(call(subnet, inputs), key)
        if mode == "eval":
            moved = [k for k, v in subnet.named_buffers() if not torch.equal(v, buffers[k])]
            assert not moved, f"subnet {s} changed buffers {moved[:4]} in evaluation mode"
        exp_leaves, exp_spec = leaves(expected)
        act_leaves, act_spec = leaves(actual)
        assert exp_spec == act_spec, f"subnet {s}: output structure {act_spec} != {exp_spec}"
        for i, (a, e) in enumerate(zip(act_leaves, exp_leaves)):
            if isinstance(e, torch.Tensor):
                assert_close(a, e, f"subnet {s} output leaf {i}", atol)
            else:
                assert a == e


def check_sgd_step(
    ist: istfx.ISTModel,
    inputs: Inputs,
    round: int,
    subnet_index: int,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    key: str | None = None,
    lr: float = 0.1,
    atol: float = ATOL,
    mode: str = "train",
) -> None:
    """(3) one SGD step on a subnet equals one on the masked full model (both in `mode`), and
    reassembles into its slices (running statistics included after a training-mode step)."""
    subnets = in_mode(ist.decompose(round), mode)
    slices = ist.slices(round)
    s = subnet_index
    subnet = subnets[s]
    full = masked_model(ist, slices, s, mode)
    for module in (subnet, full):
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr)
        opt.zero_grad()
        loss_fn(pick(call(module, inputs), key)).backward()
        opt.step()

    sub_state = subnet_state(subnet)
    with torch.no_grad():
        for name in ist.trainable_state:
            if name not in sub_state:
                continue
            expected = slices.take(name, model_tensor(ist, full, name).detach(), s)
            assert_close(sub_state[name].detach(), expected, f"{name} after one SGD step (subnet {s})", atol)

    before = snapshot(ist.model)
    before_named = {n: ist.state_tensor(n).detach().clone() for n in ist.trainable_state}
    report = ist.reassemble([subnet])
    assert report.accepted == [s]
    assert report.rejected == {}
    assert report.missing == [i for i in range(ist.plan.subnets) if i != s]
    with torch.no_grad():
        for name in ist.trainable_state:
            if name not in sub_state:
                continue
            now = ist.state_tensor(name).detach()
            held = slices.take(name, now, s)
            assert torch.equal(held, sub_state[name].detach().to(held.dtype)), f"{name}: held slice not written back"
            if slices.is_cut(name):
                mask = held_mask(slices, name, now.shape, s).bool()
                assert torch.equal(now[~mask], before_named[name][~mask]), f"{name}: units of other subnets changed"
    assert snapshot(ist.model).keys() == before.keys()


def check_interface(ist: istfx.ISTModel, variants: list[Inputs], round: int = 0, mode: str = "train") -> None:
    """(4) each subnet, in `mode`, accepts every input variant and matches the model's output structure
    and shapes (the model in the same mode)."""
    subnets = in_mode(ist.decompose(round), mode)
    reference = copy.deepcopy(ist.model).train(mode == "train")
    for inputs in variants:
        expected_leaves, expected_spec = leaves(call(reference, inputs))
        for s, subnet in enumerate(subnets):
            got_leaves, got_spec = leaves(call(subnet, inputs))
            assert got_spec == expected_spec, f"subnet {s}: structure {got_spec} != {expected_spec}"
            for i, (g, e) in enumerate(zip(got_leaves, expected_leaves)):
                if isinstance(e, torch.Tensor):
                    assert isinstance(g, torch.Tensor)
                    assert g.shape == e.shape, f"subnet {s} leaf {i}: {tuple(g.shape)} != {tuple(e.shape)}"
                    assert g.dtype == e.dtype
                    if g.is_floating_point():
                        assert torch.isfinite(g).all()


# A model file (the contract of istfx train) of a 64 -> 48 (BatchNorm with running statistics) -> 40 -> 10
# MLP: fc2 is cut along both axes, so under sharded its idle blocks park at home ranks.
BN_MLP_MODEL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    """64 -> 48 (BatchNorm with running statistics) -> 40 -> 10."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.bn1 = nn.BatchNorm1d(48)
        self.fc2 = nn.Linear(48, 40)
        self.fc3 = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


def build_model():
    return Net()


example_inputs = (torch.randn(8, 64),)
'''


# -- processes (Linux /proc) ------------------------------------------------------


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, now."""
    return _children_by_parent().get(pid, [])


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), now."""
    children = _children_by_parent()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
