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
    RoundResult,
    SubnetResult,
    get_backend,
    subnet_bytes,
    subnet_parameters,
)
from istfx.models import ISTMLP

import istfx
from istfx.errors import ISTError
from istfx.runtime import comm
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


# -- the backend contract ------------------------------------------------------------------
class Sequential(Backend):
    """The smallest backend: only run_round; every other method is the contract's default."""

    name = "sequential"

    def run_round(self, ist, round, train_subnet):
        subnets = ist.decompose(round)
        results = [train_subnet(i, s) for i, s in enumerate(subnets)]
        report = ist.reassemble(subnets, weights=[max(r.samples, 1) for r in results])
        return RoundResult(round, results, report, [subnet_parameters(s) for s in subnets],
                           [subnet_bytes(s) for s in subnets])


def test_minimal_backend_subclass_trains_and_resumes_like_the_local_backend(tmp_path):
    batches = small_batches()
    kwargs = dict(local_steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), eval_data=batches, progress=False)
    local, _ = small_ist(subnets=2)
    expected = fit(local, batches, rounds=3, backend="local", **kwargs)
    ist, _ = small_ist(subnets=2)
    history = fit(ist, batches, rounds=3, backend=Sequential(), **kwargs)
    assert history.metric("train_loss") == expected.metric("train_loss")
    assert history.metric("eval_loss") == expected.metric("eval_loss")
    for (name, p), q in zip(ist.model.named_parameters(), local.model.parameters()):
        assert torch.equal(p, q), name
    # the default prepare / save_checkpoint: a run resumed from round 1 ends where the uninterrupted one did
    resumed, _ = small_ist(subnets=2)
    fit(resumed, batches, rounds=2, backend=Sequential(), checkpoint_dir=tmp_path, checkpoint_every=1, **kwargs)
    again, _ = small_ist(subnets=2, seed=7)  # other initial weights: the checkpoint must replace them
    tail = fit(again, batches, rounds=3, backend=Sequential(), checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert [row["round"] for row in tail] == [2]
    assert tail.last["train_loss"] == expected.last["train_loss"]
    for (name, p), q in zip(again.model.named_parameters(), local.model.parameters()):
        assert torch.equal(p, q), name
    manifest = json.loads((tmp_path / "round-000001" / "manifest.json").read_text())
    assert manifest["backend"] == "sequential" and manifest["topology"] is None


class Recording(Sequential):
    """Records every contract call; a non-main process whose steps draw two batches each."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.stepped = 0

    @property
    def is_main(self) -> bool:
        self.calls.append("is_main")
        return False

    @property
    def draws_per_step(self) -> int:
        return 2

    def make_stepper(self, subnet, optimizer):
        self.stepped += 1
        return super().make_stepper(subnet, optimizer)

    def trained_slots(self, ist):
        self.calls.append("trained_slots")
        return super().trained_slots(ist)

    def ranks(self, ist):
        self.calls.append("ranks")
        return 5

    def prepare(self, ist, start_round=0, checkpoint=None):
        self.calls.append(f"prepare {start_round}")
        return super().prepare(ist, start_round, checkpoint)

    def run_round(self, ist, round, train_subnet):
        self.calls.append(f"run_round {round}")
        return super().run_round(ist, round, train_subnet)

    def full_model(self, ist):
        self.calls.append("full_model")
        return super().full_model(ist)

    def save_checkpoint(self, ist, root, round, rank_state, manifest, keep=None):
        self.calls.append(f"save_checkpoint {round}")
        assert set(rank_state["data_positions"]) == {"0", "1"}
        super().save_checkpoint(ist, root, round, rank_state, manifest, keep)

    def finish(self, ist):
        self.calls.append("finish")


def test_fit_uses_the_contract_and_nothing_else(tmp_path):
    ist, _ = small_ist(subnets=2)
    backend = Recording()
    seen = []
    data = small_batches(n=192)  # 6 batches: 2 rounds x 1 step x 2 draws per subnet stay within one pass
    history = fit(ist, data, rounds=2, local_steps=1, backend=backend, eval_data=data, eval_every=2,
                  checkpoint_dir=tmp_path, checkpoint_every=1, metrics_path=tmp_path / "m.jsonl",
                  callback=seen.append, progress=False)
    assert backend.calls == ["prepare 0", "is_main", "trained_slots",
                             "run_round 0", "save_checkpoint 0", "ranks",
                             "run_round 1", "full_model", "save_checkpoint 1", "ranks", "finish"]
    assert backend.stepped == 4  # a stepper per subnet per round
    assert history[0]["samples"] == 2 * 2 * 32  # subnets x draws per step x batch size
    # not the main process: no metrics file, no callback; the rows are still returned
    assert not (tmp_path / "m.jsonl").exists() and seen == []
    param_bytes = sum(p.numel() * p.element_size() for p in ist.model.parameters())
    assert history[0]["world_size"] == 5
    assert history[0]["ddp_bytes_per_rank"] == comm.data_parallel_bytes(param_bytes, 5, steps=1)


def test_backends_without_state_travel_refuse_carried_optimizer_state_and_the_outer_step():
    ist, _ = small_ist(subnets=2)
    for kwargs in ({"carry_optimizer_state": True}, {"optimizer_state": "carry"}, {"outer_lr": 0.7}):
        with pytest.raises(ISTError, match="keeps no optimizer state"):
            fit(ist, small_batches(), rounds=1, local_steps=1, backend=Sequential(), progress=False, **kwargs)


def test_an_object_that_is_not_a_backend_is_refused_with_the_contract_to_implement():
    class DuckTyped:
        name = "duck"

        def run_round(self, ist, round, train_subnet):
            raise AssertionError("never called")

    ist, _ = small_ist(subnets=2)
    with pytest.raises(ISTError, match="subclass of istfx.backends.Backend"):
        fit(ist, small_batches(), rounds=1, local_steps=1, backend=DuckTyped(), progress=False)
    with pytest.raises(TypeError, match="run_round"):
        Backend()  # the one method without a default


def test_byte_comparison_is_in_every_row_and_sums_over_the_run():
    ist, _ = small_ist(subnets=4)
    history = fit(ist, small_batches(), rounds=3, local_steps=2, progress=False)
    param_bytes = sum(p.numel() * p.element_size() for p in ist.model.parameters())
    totals = comm.ByteTotals()
    for row in history:
        assert row["ddp_bytes_per_rank"] == comm.data_parallel_bytes(param_bytes, 4, steps=2)
        assert row["local_sgd_bytes_per_rank"] == comm.local_sgd_bytes(param_bytes, 4)
        assert row["model_parameter_bytes"] == param_bytes and row["world_size"] == 4
        assert totals.add(row) == (max(row["bytes_per_subnet"]),) * 2
    assert not totals.measured and totals.rounds == 3  # the local backend sends nothing: a ps worker's bytes
    assert totals.ist == 3 * max(history[0]["bytes_per_subnet"])
    assert totals.ratio == pytest.approx(3 * comm.data_parallel_bytes(param_bytes, 4, 2) / totals.ist)
    measured = comm.ByteTotals()
    measured.add({"bytes_sent": [10, None, 30], "bytes_received": [5, 7, None], "ddp_bytes_per_rank": 90.0})
    assert measured.measured and measured.ist == 30 and measured.ratio == 3.0


def test_a_registered_backend_is_found_by_name(monkeypatch):
    from istfx.runtime import backend_api

    monkeypatch.setitem(backend_api.BACKENDS, "sequential", Sequential)
    assert set(BACKENDS) >= {"local", "torch", "deepspeed", "sequential"}
    ist, _ = small_ist(subnets=2)
    history = fit(ist, small_batches(), rounds=1, local_steps=1, backend=" Sequential", progress=False)
    assert len(history) == 1 and history.last["world_size"] == 2
    backend_api.register_backend(" Other ", Sequential)
    try:
        assert BACKENDS["other"] is Sequential
    finally:
        del backend_api.BACKENDS["other"]
