"""istfx.runtime.training.fit and the local backend: learning, metrics, optimizer state, bad inputs, NaN updates."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from istfx.backends import (
    BACKENDS,
    Backend,
    LocalBackend,
    SubnetResult,
    get_backend,
    subnet_bytes,
)
from istfx.models import ISTMLP

import istfx
from istfx.errors import ISTError
from istfx.runtime.training import _OptimizerState, evaluate, fit

ROW_KEYS = {
    "round", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "samples", "samples_total",
    "epochs", "seconds", "parameters_per_subnet", "bytes_per_subnet", "rejected", "rejected_reasons",
}


def small_batches(n: int = 96, batch: int = 32, features: int = 16, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def small_ist(subnets: int, seed: int = 1, width: int = 32):
    torch.manual_seed(seed)
    model = ISTMLP(16, [width, width], 5)
    reference = copy.deepcopy(model)
    return istfx.compile(model, subnets=subnets), reference


def train_plain(model, batches, steps: int, optimizer):
    """Full-model minibatch training over `batches`, restarted when exhausted."""
    opt = optimizer(list(model.parameters()))
    stream = iter(())
    for _ in range(steps):
        try:
            x, y = next(stream)
        except StopIteration:
            stream = iter(batches)
            x, y = next(stream)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# -- learning on real data -------------------------------------------------------
@pytest.fixture(scope="module")
def digits_loaders():
    pytest.importorskip("sklearn")
    from istfx.runtime.data import digits, loaders

    train, test = digits(seed=0)
    return loaders(train, test, batch_size=128, seed=0)


def test_fit_on_digits_learns_and_writes_metrics(digits_loaders, tmp_path):
    train_loader, test_loader = digits_loaders
    torch.manual_seed(0)
    model = ISTMLP(64, [128, 128], 10)
    ist = istfx.compile(model, subnets=4)
    before = evaluate(model, test_loader)["accuracy"]
    path = tmp_path / "metrics.jsonl"
    history = fit(ist, train_loader, rounds=4, local_steps=5, eval_data=test_loader, metrics_path=path,
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.2), progress=False)
    after = evaluate(model, test_loader)["accuracy"]
    assert ist.model is model and model.training
    assert after > before + 0.3 and after > 0.8
    assert history.last["eval_accuracy"] == pytest.approx(after)

    lines = path.read_text().splitlines()
    assert len(lines) == 4
    rows = [json.loads(line) for line in lines]
    for r, row in enumerate(rows):
        assert set(row) >= ROW_KEYS
        assert row["round"] == r and row["rejected"] == []
        assert row["parameters_per_subnet"] == ist.plan.parameters_per_subnet
        assert 0 < row["train_accuracy"] <= 1 and math.isfinite(row["train_loss"])
        assert row["samples"] <= 4 * 5 * 128
    assert rows[-1]["samples_total"] == sum(row["samples"] for row in rows)
    assert rows[-1]["epochs"] == pytest.approx(rows[-1]["samples_total"] / len(train_loader.dataset))
    # 4 subnets of 32 neurons per hidden layer: parameters in float32, no buffers.
    assert rows[0]["bytes_per_subnet"] == [4 * n for n in ist.plan.parameters_per_subnet]

    # a second run appends
    fit(ist, train_loader, rounds=1, local_steps=1, metrics_path=path, progress=False)
    assert len(path.read_text().splitlines()) == 5


BATCH = 16  # capture currently fixes the batch size of models with several batched inputs


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(4, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x, z):
        return self.out(torch.relu(self.a(x) + self.b(z)))


# -- optimizer state ---------------------------------------------------------------


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
], ids=["sgd-momentum", "adam"])
def test_single_subnet_with_carried_state_equals_full_training(make_optimizer):
    batches = small_batches()
    ist, reference = small_ist(subnets=1)
    fit(ist, batches, rounds=4, local_steps=2, optimizer=make_optimizer, carry_optimizer_state=True,
        progress=False)
    train_plain(reference, batches, steps=8, optimizer=make_optimizer)
    assert max_diff(ist.model, reference) <= 1e-6


def test_optimizer_state_is_reset_each_round_by_default():
    batches = small_batches()
    make_optimizer = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    ist, reference = small_ist(subnets=1)
    fit(ist, batches, rounds=4, local_steps=2, optimizer=make_optimizer, progress=False)
    train_plain(reference, batches, steps=8, optimizer=make_optimizer)
    assert max_diff(ist.model, reference) > 1e-3

    # ... and equals full training that restarts its optimizer every 2 steps
    ist, reference = small_ist(subnets=1)
    fit(ist, batches, rounds=4, local_steps=2, optimizer=make_optimizer, progress=False)
    stream = [batches[i % len(batches)] for i in range(8)]
    for r in range(4):
        train_plain(reference, stream[2 * r:2 * r + 2], steps=2, optimizer=make_optimizer)
    assert max_diff(ist.model, reference) <= 1e-6


def test_carried_state_round_trips_through_slices():
    torch.manual_seed(0)
    ist = istfx.compile(TwoInputs(), subnets=3, example_inputs=(torch.randn(BATCH, 8), torch.randn(BATCH, 4)))
    slices = ist.slices(0)
    store = _OptimizerState(ist)
    states = []
    for s in range(3):
        subnet_state = {}
        for name, shape in ist.plan.state_shapes.items():
            held = tuple(size if i is None else len(i) for size, i in zip(shape, slices.indices[s][name]))
            subnet_state[name] = {"exp_avg": torch.randn(held), "step": torch.tensor(float(s + 1))}
        states.append((s, subnet_state, float(s + 1)))
    store.write_back(slices, states)
    cut = [n for n in ist.plan.state_shapes if slices.is_cut(n)]
    shared = [n for n in ist.plan.state_shapes if not slices.is_cut(n)]
    assert cut and shared
    for s, subnet_state, _ in states:
        back = store.for_subnet(slices, s)
        for name, entry in subnet_state.items():
            assert back[name]["step"].item() == 3.0  # scalars: the maximum over subnets
            if name in cut:  # disjoint slices come back exactly
                assert torch.equal(back[name]["exp_avg"], entry["exp_avg"])
    for name in shared:  # shared tensors: the average weighted like the parameters
        mean = sum(w * st[name]["exp_avg"] for _, st, w in states) / 6
        torch.testing.assert_close(store.full[name]["exp_avg"], mean)


def test_carry_with_several_subnets_runs_and_differs_from_reset():
    batches = small_batches()
    make_optimizer = lambda p: torch.optim.Adam(p, lr=0.01)
    ist_carry, _ = small_ist(subnets=2)
    ist_reset, _ = small_ist(subnets=2)
    fit(ist_carry, batches, rounds=3, local_steps=2, optimizer=make_optimizer, carry_optimizer_state=True,
        progress=False)
    fit(ist_reset, batches, rounds=3, local_steps=2, optimizer=make_optimizer, progress=False)
    assert all(torch.isfinite(p).all() for p in ist_carry.model.parameters())
    assert max_diff(ist_carry.model, ist_reset.model) > 1e-4


# -- inputs ------------------------------------------------------------------------
def test_tuple_inputs_and_non_classification_targets():
    torch.manual_seed(0)
    model = TwoInputs()
    ist = istfx.compile(model, subnets=2, example_inputs=(torch.randn(BATCH, 8), torch.randn(BATCH, 4)))
    g = torch.Generator().manual_seed(0)
    batches = [((torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)),
                torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(3)]
    history = fit(ist, batches, rounds=2, local_steps=3, eval_data=batches, progress=False)
    assert history.last["eval_accuracy"] is not None and history.last["epochs"] is None
    regression = [(inputs, torch.randn(BATCH, 3, generator=g)) for inputs, _ in batches]
    history = fit(ist, regression, rounds=2, local_steps=1, loss_fn=torch.nn.functional.mse_loss,
                  eval_data=regression, eval_every=2, progress=False)
    assert history[0]["eval_loss"] is None and history[1]["eval_loss"] > 0
    assert history.last["train_accuracy"] is None and history.last["eval_accuracy"] is None


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 0, "local_steps": 1}, "rounds must be an int >= 1"),
    ({"rounds": 1, "local_steps": 0}, "local_steps must be an int >= 1"),
    ({"rounds": 1, "local_steps": 1, "eval_every": 0}, "eval_every must be an int >= 1"),
    ({"rounds": 1, "local_steps": 1, "backend": "mpi"}, "unknown backend 'mpi'"),
    ({"rounds": 1, "local_steps": 1, "backend": object()}, "run_round"),
])
def test_bad_arguments(kwargs, message):
    ist, _ = small_ist(subnets=2)
    with pytest.raises(ISTError, match=message):
        fit(ist, small_batches(), progress=False, **kwargs)


def test_empty_or_malformed_train_data():
    ist, _ = small_ist(subnets=2)
    with pytest.raises(ISTError, match="train_data is empty"):
        fit(ist, [], rounds=1, local_steps=1, progress=False)
    with pytest.raises(ISTError, match="yielded no batches"):
        fit(ist, (b for b in []), rounds=1, local_steps=1, progress=False)
    with pytest.raises(ISTError, match="a generator cannot be restarted"):
        fit(ist, (b for b in small_batches()), rounds=2, local_steps=3, progress=False)
    with pytest.raises(ISTError, match=r"pair \(inputs, targets\)"):
        fit(ist, [torch.randn(4, 16)], rounds=1, local_steps=1, progress=False)
    with pytest.raises(ISTError, match="ISTModel"):
        fit(torch.nn.Linear(2, 2), small_batches(), rounds=1, local_steps=1, progress=False)


# -- non-finite updates --------------------------------------------------------------
class PoisonedSGD(torch.optim.SGD):
    """SGD that writes NaN into its first parameter."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))


def test_non_finite_subnet_is_rejected_and_reported(tmp_path):
    batches = small_batches()
    ist, _ = small_ist(subnets=3)
    calls = []

    def make_optimizer(params):  # the second subnet of round 0 goes bad
        calls.append(1)
        cls = PoisonedSGD if len(calls) == 2 else torch.optim.SGD
        return cls(params, lr=0.1)

    path = tmp_path / "m.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(ist, batches, rounds=2, local_steps=2, optimizer=make_optimizer, eval_data=batches,
                      metrics_path=path, progress=False)
    assert any("rejected" in str(w.message) for w in caught)
    assert history[0]["rejected"] == [1] and "non-finite" in history[0]["rejected_reasons"][1]
    assert history[1]["rejected"] == []
    assert history.reports[0].rejected and history.reports[0].accepted == [0, 2]
    assert all(torch.isfinite(p).all() for p in ist.model.parameters())
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(history.last["eval_loss"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["rejected"] == [1] and rows[0]["rejected_reasons"] == {"1": history[0]["rejected_reasons"][1]}


def test_nan_loss_with_carried_state_keeps_state_finite():
    batches = small_batches()
    ist, _ = small_ist(subnets=2)
    calls = []

    def loss_fn(outputs, targets):  # NaN for every step of the first subnet trained
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        return loss * float("nan") if len(calls) <= 2 else loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = fit(ist, batches, rounds=3, local_steps=2, loss_fn=loss_fn, carry_optimizer_state=True,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), progress=False)
    assert history[0]["rejected"] == [0] and history[1]["rejected"] == []
    assert all(torch.isfinite(p).all() for p in ist.model.parameters())


# -- backend interface ----------------------------------------------------------------
def test_backend_registry_and_local_round():
    assert isinstance(get_backend("local"), LocalBackend) and "local" in BACKENDS
    backend = LocalBackend()
    assert isinstance(backend, Backend) and get_backend(backend) is backend
    ist, _ = small_ist(subnets=2)
    seen = []

    def train_subnet(index, subnet):
        seen.append((index, subnet_bytes(subnet)))
        return SubnetResult(samples=10 * (index + 1), loss_sum=5.0 * (index + 1), correct=index, steps=1)

    before = {n: p.detach().clone() for n, p in ist.model.named_parameters()}
    result = backend.run_round(ist, 0, train_subnet)
    assert [i for i, _ in seen] == [0, 1]
    assert result.bytes_per_subnet == [b for _, b in seen] == [4 * n for n in ist.plan.parameters_per_subnet]
    assert result.samples == 30 and result.loss == pytest.approx(0.5) and result.accuracy == pytest.approx(1 / 30)
    assert result.report.accepted == [0, 1] and not result.report.rejected
    for name, param in ist.model.named_parameters():  # untrained subnets: nothing changes
        assert torch.equal(param, before[name])
