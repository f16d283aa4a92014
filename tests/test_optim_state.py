"""Optimizer state that travels with its units, the outer step and the training recipe, piece by piece."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

import istfx
from istfx.errors import ISTError
from istfx.runtime import optim_state, optimizers
from istfx.runtime.outer import FullOuter, OuterStep, held_mask


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _ist(subnets: int = 2, policy: str = "disjoint"):
    return istfx.compile(_mlp(), subnets, example_inputs=(torch.randn(4, 6, dtype=torch.float64),), policy=policy)


# -- the outer step ---------------------------------------------------------------------------------
def test_outer_step_is_torch_nesterov_sgd_on_the_pseudo_gradient():
    torch.manual_seed(1)
    step = OuterStep(lr=0.7, momentum=0.9)
    reference = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    value, buffer = reference.detach().clone(), None
    for _ in range(4):
        new = value + 0.1 * torch.randn(5, 4, dtype=torch.float64)  # what a round of training produced
        reference.grad = reference.detach() - new
        sgd.step()
        value, buffer = step.update(value, new, buffer)
        assert torch.allclose(value, reference.detach(), rtol=0, atol=1e-15)
    assert torch.equal(buffer, sgd.state[reference]["momentum_buffer"])


def test_outer_step_lr1_momentum0_is_the_new_value_itself():
    old, new = torch.randn(7), torch.randn(7)
    value, buffer = OuterStep(1.0, 0.0).update(old, new, None)
    assert value is new and buffer is None
    assert OuterStep(1.0, 0.0).identity and not OuterStep(0.7, 0.0).identity


def test_outer_step_leaves_unheld_elements_and_their_momentum():
    step = OuterStep(0.5, 0.9)
    old = torch.zeros(4)
    new = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([True, False, True, False])
    buffer = torch.full((4,), 0.25)
    value, stepped = step.update(old, new, buffer, mask)
    assert value[1] == 2.0 and value[3] == 4.0
    assert stepped[1] == 0.25 and stepped[3] == 0.25
    assert stepped[0] == pytest.approx(0.9 * 0.25 - 1.0)


@pytest.mark.parametrize("lr, momentum", [(0.0, 0.0), (-1.0, 0.5), (1.0, 1.0), (float("nan"), 0.0)])
def test_outer_step_refuses_bad_settings(lr, momentum):
    with pytest.raises(ISTError):
        OuterStep(lr, momentum)


def test_full_outer_steps_only_what_accepted_subnets_held():
    ist = _ist(2, policy="overlap(0.5)")
    slices = ist.slices(0)
    name = "0.weight"
    shape = ist.state_tensor(name).shape
    only0 = held_mask(slices, name, shape, [0])
    both = held_mask(slices, name, shape, [0, 1])
    assert only0.any() and not only0.all() and both.sum() > only0.sum()
    tensors = {n: ist.state_tensor(n) for n in ist.trainable_state}
    outer = FullOuter(OuterStep(0.5, 0.9))
    outer.begin(tensors)
    before = {n: t.detach().clone() for n, t in tensors.items()}
    with torch.no_grad():
        for t in tensors.values():
            t.add_(1.0)
    outer.finish(tensors, slices, {0: list(tensors)})
    changed = tensors[name].detach()
    # held by subnet 0: old - 0.5 * (g + 0.9 g) with g = -1  ->  old + 0.95; elsewhere the new value (old + 1)
    assert torch.allclose(changed[only0], before[name][only0] + 0.95)
    assert torch.allclose(changed[~only0], before[name][~only0] + 1.0)
    assert outer.momentum[name][~only0].abs().max() == 0


# -- full-size state ----------------------------------------------------------------------------------
def test_full_state_cuts_and_writes_back_like_the_parameters():
    ist = _ist(2)
    slices = ist.slices(0)
    shapes = ist.plan.state_shapes
    state = optim_state.FullState(shapes)
    assert not state
    # Subnets' "momentum" = their own parameter slice: written back, the full state equals the model.
    subnets = ist.decompose(0)
    trained = []
    for s, subnet in enumerate(subnets):
        named = dict(subnet.named_parameters())
        trained.append((s, {n: {"exp_avg": p.detach() * 2, "step": torch.tensor(float(3 + s))}
                            for n, p in named.items()}, 1.0))
    state.write_back(slices, trained)
    for name in ist.trainable_state:
        assert torch.equal(state.full[name]["exp_avg"], ist.state_tensor(name).detach() * 2), name
        assert float(state.scalars[name]["step"]) == 4.0  # the maximum over subnets
    for s, subnet in enumerate(subnets):
        cut = state.for_subnet(slices, s)
        for n, p in subnet.named_parameters():
            assert torch.equal(cut[n]["exp_avg"], p.detach() * 2)
    restored = optim_state.FullState(shapes)
    restored.load_state_dict(state.state_dict())
    assert restored.full.keys() == state.full.keys()
    assert all(torch.equal(restored.full[n]["exp_avg"], state.full[n]["exp_avg"]) for n in state.full)


def test_state_crosses_the_wire_unchanged():
    state = {"a.weight": {"exp_avg": torch.randn(3, 2), "step": torch.tensor(5.0), "count": 7},
             "b.bias": {"momentum_buffer": torch.randn(4, dtype=torch.float64)}}
    layout, tensors = optim_state.flatten(state)
    again = optim_state.unflatten(optim_state.decode_layout(optim_state.encode_layout(layout)),
                                  [t.clone() for t in tensors])
    assert again.keys() == state.keys()
    assert torch.equal(again["a.weight"]["exp_avg"], state["a.weight"]["exp_avg"])
    assert again["a.weight"]["count"] == 7.0 and isinstance(again["a.weight"]["count"], float)
    assert torch.equal(again["b.bias"]["momentum_buffer"], state["b.bias"]["momentum_buffer"])
    assert [s for s, _ in optim_state.layout_specs(layout)] == [tuple(t.shape) for t in tensors]
    with pytest.raises(ISTError, match="reset"):
        optim_state.flatten({"x": {"bad": "text"}})


def test_load_into_and_extract_round_trip_an_adamw_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    named = dict(model.named_parameters())
    state = optim_state.extract(opt, named)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    optim_state.load_into(fresh, named, state)
    for name, param in named.items():
        for key, value in opt.state[param].items():
            assert torch.equal(fresh.state[param][key], value)
            assert fresh.state[param][key] is not value  # copies: the caller's state is never stepped in place
    assert optim_state.state_nbytes(state) == sum(v.numel() * v.element_size() for e in state.values()
                                                  for v in e.values())


def test_check_mode():
    assert optim_state.check_mode(" Carry ") == "carry"
    with pytest.raises(ISTError, match="carry"):
        optim_state.check_mode("keep")


# -- the recipe ---------------------------------------------------------------------------------------
def test_lr_factor_warmup_then_cosine_to_zero():
    f = [optimizers.lr_factor(s, warmup_steps=4, schedule="cosine", total_steps=14) for s in range(15)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[14] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[9] == pytest.approx(0.5)
    assert optimizers.lr_factor(100, warmup_steps=4) == 1.0
    with pytest.raises(ISTError, match="total"):
        optimizers.lr_factor(5, schedule="cosine")


def _optimizer_parser() -> argparse.ArgumentParser:
    from istfx.cli.options import add_optimizer_options

    parser = argparse.ArgumentParser()
    add_optimizer_options(parser)
    return parser


def test_recipe_from_flags_builds_adamw_with_its_settings():
    args = _optimizer_parser().parse_args([
        "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "0.1", "--betas", "0.9,0.95", "--warmup-steps",
        "10", "--lr-schedule", "cosine", "--clip-grad-norm", "1", "--optimizer-state", "carry", "--outer-lr", "0.7",
        "--outer-momentum", "0.9"])
    recipe = optimizers.from_args(args)
    opt = recipe.build([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.1 and group["betas"] == (0.9, 0.95)
    kwargs = recipe.fit_kwargs(total_steps=110)
    assert kwargs["optimizer_state"] == "carry" and kwargs["outer_lr"] == 0.7 and kwargs["clip_grad_norm"] == 1.0
    assert kwargs["lr_schedule"](0) == pytest.approx(0.1) and kwargs["lr_schedule"](110) == pytest.approx(0.0)
    assert "outer Nesterov lr 0.7" in recipe.describe()
    assert optimizers.TrainingRecipe().schedule(None) is None
    default = optimizers.from_args(_optimizer_parser().parse_args([]))
    assert default == optimizers.TrainingRecipe() and default.fit_kwargs(10)["outer_lr"] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "lamb"}, "optimizer"), ({"lr": 0.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"),
    ({"warmup_steps": -1}, "warmup"), ({"clip_grad_norm": 0.0}, "clip"), ({"optimizer_state": "x"}, "carry"),
    ({"outer_momentum": 1.5}, "momentum"), ({"lr_schedule": "linear"}, "schedule"),
])
def test_recipe_refuses_bad_values(kwargs, match):
    with pytest.raises(ISTError, match=match):
        optimizers.TrainingRecipe(**kwargs)


def test_betas_flag_refuses_one_number():
    parser = _optimizer_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--betas", "0.9"])
    assert math.isclose(parser.parse_args(["--betas", "0.8 0.9"]).betas[1], 0.9)


def test_step_control_schedules_and_clips_like_a_plain_loop():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    twin = nn.Linear(4, 3).double()
    twin.load_state_dict(model.state_dict())
    schedule = optimizers.TrainingRecipe(warmup_steps=2, lr_schedule="cosine").schedule(total_steps=6)
    control = optimizers.StepControl(schedule, clip_grad_norm=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.9)

    class Plain:
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.step()

    stepper = control.wrap(Plain(opt), opt, first_step=2)
    for step in range(2, 5):
        x = torch.randn(5, 4, dtype=torch.float64)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            (m(x) ** 2).sum().backward()
        stepper.step()
        for group in ref.param_groups:
            group["lr"] = 0.3 * optimizers.lr_factor(step, 2, "cosine", 6)
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 0.5)
        ref.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert optimizers.StepControl().wrap(stepper, opt, 0) is stepper


@pytest.mark.parametrize("compress", [None, "int8"])
def test_packed_state_round_trips_and_quantizes_only_the_shaped_tensors(compress):
    torch.manual_seed(0)
    state = {"w": {"exp_avg": torch.randn(6, 5), "exp_avg_sq": torch.rand(6, 5), "step": torch.tensor(12.0)},
             "b": {"momentum_buffer": torch.randn(6)}}
    buffer, layout_nbytes = optim_state.pack_state(state, compress=compress)
    assert buffer.dtype == torch.uint8 and 0 < layout_nbytes < buffer.numel()
    again = optim_state.unpack_state(buffer, layout_nbytes, compress)
    assert float(again["w"]["step"]) == 12.0  # scalars exact whatever the compression
    for name, entry in state.items():
        for key, value in entry.items():
            if compress is None:
                assert torch.equal(again[name][key], value)
            else:
                assert torch.allclose(again[name][key], value, atol=float(value.abs().max()) / 100)
    if compress:
        raw, _ = optim_state.pack_state(state)
        assert buffer.numel() < raw.numel()
