"""Bad input is refused with a clear message, and refusals leave the model untouched."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise_equal, snapshot, subnet_state
from istfx.models import ISTMLP
from torch import nn

import istfx


def _mlp(hidden=(16, 12)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ISTMLP(6, list(hidden), 3).double(), torch.randn(5, 6, dtype=torch.float64)


def _compiled(subnets: int = 3, **kwargs) -> tuple[istfx.ISTModel, torch.Tensor]:
    model, x = _mlp()
    return istfx.compile(model, subnets=subnets, example_inputs=(x,), **kwargs), x


# -- compile arguments ------------------------------------------------------------------


@pytest.mark.parametrize("model", [lambda x: x, "a model", None, torch.randn(3)])
def test_not_a_module(model) -> None:
    with pytest.raises(istfx.ISTError, match="expects a torch.nn.Module"):
        istfx.compile(model, subnets=2)


@pytest.mark.parametrize("subnets", [0, -1, 1.5, True, False, "2", None])
def test_bad_subnet_count(subnets) -> None:
    model, x = _mlp()
    with pytest.raises(istfx.ISTError, match=r"subnets must be an int >= 1") as info:
        istfx.compile(model, subnets=subnets, example_inputs=(x,))
    assert repr(subnets) in str(info.value)


def test_more_subnets_than_units() -> None:
    torch.manual_seed(0)
    model = ISTMLP(6, 4, 3).double()
    with pytest.raises(istfx.ISTError, match=r"subnets=8 is larger than every splittable group") as info:
        istfx.compile(model, subnets=8, example_inputs=(torch.randn(5, 6, dtype=torch.float64),))
    assert "subnets <= 4" in str(info.value)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent Python control flow: export cannot capture it
            h = h.relu()
        return self.b(h)


def test_untraceable_model_raises_capture_error() -> None:
    with pytest.raises(istfx.CaptureError, match="torch.export could not capture DataDependent") as info:
        istfx.compile(DataDependent(), subnets=2, example_inputs=(torch.randn(4, 6),))
    assert info.value.__cause__ is not None
    assert "data-dependent" in str(info.value)
    assert isinstance(info.value, istfx.ISTError)


def test_nothing_splittable() -> None:
    with pytest.raises(istfx.ISTError, match="nothing in Linear can be split") as info:
        istfx.compile(nn.Linear(6, 3), subnets=2, example_inputs=(torch.randn(4, 6),))
    assert "model input" in str(info.value) and "model output" in str(info.value)


@pytest.mark.parametrize("policy", ["random", "overlap(1.5)", "overlap(0)"])
def test_bad_policy(policy: str) -> None:
    model, x = _mlp()
    with pytest.raises(ValueError, match="overlap keep must be in|unknown policy"):
        istfx.compile(model, subnets=2, example_inputs=(x,), policy=policy)


@pytest.mark.parametrize("sizes", [[0.5], [0.7, 0.7], [0.0, 0.5], [1.5, 0.2]])
def test_bad_sizes(sizes) -> None:
    model, x = _mlp()
    with pytest.raises(istfx.ISTError, match="sizes must give|cannot hold more than all units"):
        istfx.compile(model, subnets=2, example_inputs=(x,), sizes=sizes)


def test_bad_example_inputs() -> None:
    model, _ = _mlp()
    with pytest.raises(istfx.ISTError, match="example_inputs must be"):
        istfx.compile(model, subnets=2, example_inputs=3.0)


def test_bad_round() -> None:
    ist, _ = _compiled()
    for round in (-1, 1.0, "0"):
        with pytest.raises(istfx.ISTError, match="round must be a non-negative int"):
            ist.decompose(round)


# -- reassemble --------------------------------------------------------------------------


def test_reassemble_subnets_of_another_round() -> None:
    ist, _ = _compiled()
    old = ist.decompose(0)
    ist.decompose(1)
    before = snapshot(ist.model)
    with pytest.raises(istfx.ISTError, match=r"subnets of round 0 handed back while round 1 is open"):
        ist.reassemble(old)
    assert_bitwise_equal(before, snapshot(ist.model), "after a refused reassembly")


def test_reassemble_subnets_of_another_plan() -> None:
    ist, x = _compiled()
    other = istfx.compile(ist.model, subnets=3, example_inputs=(x,))
    foreign = other.decompose(0)
    ist.decompose(0)
    with torch.no_grad():
        for subnet in foreign:
            for p in subnet.parameters():
                p.add_(1.0)
    before = snapshot(ist.model)
    with pytest.raises(istfx.ISTError, match="another compiled plan"):
        ist.reassemble(foreign)
    assert_bitwise_equal(before, snapshot(ist.model), "after a refused reassembly")


def test_reassemble_refusals_leave_the_model_untouched() -> None:
    ist, _ = _compiled()
    closed = ist.decompose(0)
    ist.reassemble(closed)
    before = snapshot(ist.model)
    with pytest.raises(istfx.ISTError, match="no round is open"):
        ist.reassemble(closed)
    subnets = ist.decompose(0)
    cases = [
        ([], "expects the list of subnets"),
        ([nn.Linear(2, 2)], "was not made by ISTModel.decompose"),
        ([subnets[0], subnets[0]], "subnet slots repeat"),
    ]
    for given, phrase in cases:
        with pytest.raises(istfx.ISTError, match=phrase):
            ist.reassemble(given)
    with pytest.raises(istfx.ISTError, match="weights must be one positive number per subnet"):
        ist.reassemble(subnets, weights=[1.0, 0.0, 1.0])
    with pytest.raises(istfx.ISTError, match="on_nonfinite must be"):
        ist.reassemble(subnets, on_nonfinite="ignore")
    assert_bitwise_equal(before, snapshot(ist.model), "after refused reassemblies")


def test_reassemble_wrong_shape() -> None:
    ist, _ = _compiled()
    subnets = ist.decompose(0)
    name, param = next((n, p) for n, p in subnets[1].named_parameters() if p.dim() == 2)
    owner = subnets[1].get_submodule(name.rpartition(".")[0]) if "." in name else subnets[1]
    owner._parameters[name.rpartition(".")[2]] = nn.Parameter(torch.zeros(param.shape[0] + 1, param.shape[1],
                                                                          dtype=param.dtype))
    before = snapshot(ist.model)
    with pytest.raises(istfx.ISTError, match=rf"subnet 1: {name} has shape"):
        ist.reassemble(subnets)
    assert_bitwise_equal(before, snapshot(ist.model), "after a refused reassembly")


# -- non-finite updates -------------------------------------------------------------------


def _bn_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 3),
    ).double()
    return model, torch.randn(5, 6, dtype=torch.float64)


@pytest.mark.parametrize("poisoned", ["0.weight", "6.weight", "1.running_var", "4.bias"])
def test_nonfinite_subnet_is_skipped(poisoned: str) -> None:
    model, x = _bn_mlp()
    ist = istfx.compile(model, subnets=3, example_inputs=(x,))
    slices = ist.slices(0)
    subnets = ist.decompose(0)
    before = {n: ist.state_tensor(n).detach().clone() for n in ist.trainable_state}
    with torch.no_grad():
        for s in (0, 2):  # the healthy subnets "train": every parameter moves
            for p in subnets[s].parameters():
                p.add_(0.25)
        subnet_state(subnets[1])[poisoned].view(-1)[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="subnet 1 of round 0 rejected"):
        report = ist.reassemble(subnets)
    assert list(report.rejected) == [1]
    assert "non-finite" in report.rejected[1] and poisoned in report.rejected[1]
    assert sorted(report.accepted) == [0, 2]
    assert report.missing == []
    for name in ist.trainable_state:
        now = ist.state_tensor(name).detach()
        if now.is_floating_point():
            assert torch.isfinite(now).all(), name
        if slices.is_cut(name):
            # Subnet 1's units keep their previous values; the others take their updates.
            assert torch.equal(slices.take(name, now, 1), slices.take(name, before[name], 1)), name
            for s in (0, 2):
                assert torch.equal(slices.take(name, now, s), subnet_state(subnets[s])[name].detach()), name
        elif ist.plan.state_kinds[name] == "parameter":
            # Shared: the average of the accepted subnets only.
            assert torch.allclose(now, before[name] + 0.25, atol=1e-12), name


def test_nonfinite_subnet_raises_when_asked() -> None:
    ist, _ = _compiled()
    subnets = ist.decompose(0)
    with torch.no_grad():
        for p in subnets[0].parameters():
            p.add_(0.25)
        next(subnets[2].parameters()).fill_(float("inf"))
    before = snapshot(ist.model)
    with pytest.raises(istfx.NonFiniteUpdateError, match="subnet 2 of round 0: non-finite values") as info:
        ist.reassemble(subnets, on_nonfinite="raise")
    assert "untouched" in str(info.value)
    assert_bitwise_equal(before, snapshot(ist.model), "after a refused non-finite update")


# -- ops without an axis rule -----------------------------------------------------------------


class WithKron(nn.Module):
    """An op without an axis rule (aten.kron) on the second hidden layer only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x).relu())
        h = torch.kron(h, torch.ones(1, 1, dtype=h.dtype))
        return self.c(h)


def test_strict_names_the_unsupported_op() -> None:
    with pytest.raises(istfx.UnsupportedOpError, match="aten.kron") as info:
        istfx.compile(WithKron(), subnets=2, example_inputs=(torch.randn(4, 6),), strict=True)
    assert "no axis rule" in str(info.value)
    assert "test_bad_input.py" in str(info.value)


def test_non_strict_reports_the_unsupported_op() -> None:
    ist = istfx.compile(WithKron(), subnets=2, example_inputs=(torch.randn(4, 6),))
    found = [d for d in ist.plan.diagnostics if d.op == "aten.kron"]
    assert found, ist.plan.diagnostics
    assert "test_bad_input.py" in found[0].source
    assert "torch.kron" in found[0].source
    # The op's axes are frozen; the first hidden layer still splits.
    assert ist.plan.split
    members = {m.tensor for g in ist.plan.split for m in ist.plan.groups[g].members}
    assert "a.weight" in members and "c.weight" not in members
    assert "aten.kron" in str(ist.plan) or "kron" in ist.plan.to_json()


class WritesItsWeights(nn.Module):
    """A forward that writes a parameter: through ``.data`` or in place under ``no_grad``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "data":
            self.a.weight.data.add_(1)
        else:
            with torch.no_grad():
                self.a.bias.mul_(2)
        return self.b(self.bn(self.a(x)).relu())


@pytest.mark.parametrize("how", ["data", "no_grad"])
def test_forward_that_writes_a_parameter_is_refused_and_the_model_is_unchanged(how: str) -> None:
    torch.manual_seed(0)
    model = WritesItsWeights(how)
    before = snapshot(model)
    name = "a.weight" if how == "data" else "a.bias"
    with pytest.raises(istfx.ISTError, match=rf"forward changes its parameter\(s\) {name} in place.*unchanged"):
        istfx.compile(model, subnets=2, example_inputs=(torch.randn(4, 4),))
    assert_bitwise_equal(before, snapshot(model), "after a refused compile")


def test_compile_leaves_parameters_and_buffers_bit_for_bit_unchanged() -> None:
    """Capture runs the model (probes, tracing, the evaluation check): running statistics must not move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[6].running_var.uniform_(0.5, 2.0)
    before = snapshot(model)
    for example in ((torch.randn(4, 3, 8, 8),), None):  # given, and inferred from the first layer
        ist = istfx.compile(model, subnets=2, example_inputs=example) if example else None
        if example is None:
            model8 = nn.Sequential(*list(model))  # same tensors, inferred inputs
            ist = istfx.compile(model8, subnets=2)
        assert ist.plan.split
        assert_bitwise_equal(before, snapshot(model), "after compile")
    assert model.training
