"""Federated IST on Flower's deployment engine: a SuperLink and SuperNodes started and stopped by the tests.

Every process runs on 127.0.0.1, is bounded in time (round timeout, run
timeout) and is killed in a ``finally`` (``LocalFederation`` leaves its
``with`` block by killing the process groups it started).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import flwr  # noqa: F401  (the fl extra: these tests need Flower)
import pytest
import torch
from safetensors.torch import load_file

import istfx
from istfx.cli.loader import load_model_file
from istfx.flower.data import ClientBatches, client_indices, datasets
from istfx.flower.federation import LocalFederation, write_app
from istfx.flower.settings import FederatedSettings
from istfx.runtime.optimizers import TrainingRecipe
from istfx.runtime.training import fit

# float64 so the federated round and the local one agree to rounding; no dropout, no batch norm:
# nothing random in training. The loss kills its own process on a node started with ISTFX_TEST_DIE=1
# (a client that dies mid-round, after it received its subnet).
MODEL = textwrap.dedent('''
    import os
    import signal

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    def build_model():
        return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(),
                             nn.Linear(16, 4)).double()


    example_inputs = (torch.randn(4, 12, dtype=torch.float64),)


    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 12, generator=g, dtype=torch.float64)
        y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
        return TensorDataset(x, y)


    def train_data():
        return _data(192, 1)


    def eval_data():
        return _data(64, 2)


    def loss_fn(outputs, targets):
        if os.environ.get("ISTFX_TEST_DIE") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(outputs, targets)
''')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flmodel") / "fl_mlp.py"
    path.write_text(MODEL)
    return path


def _settings(model_file: Path, tmp: Path, **overrides) -> FederatedSettings:
    values = dict(model=str(model_file), strategy="ist", compile={"subnets": 3, "seed": 0}, rounds=1, clients=3,
                  participation=1.0, local_steps=3, batch_size=16,
                  optimizer={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
                  dirichlet=None, seed=0, round_timeout=60.0, metrics=str(tmp / "metrics.jsonl"),
                  save=str(tmp / "model.safetensors"), threads=1)
    values.update(overrides)
    return FederatedSettings(**values)


def _run(settings: FederatedSettings, tmp: Path, node_env=None) -> list[dict]:
    app = write_app(tmp / "app", settings.to_run_config())
    with LocalFederation(settings.clients, tmp / "fed", node_env=node_env) as federation:
        return federation.run_app(app, settings.metrics, settings.rounds, timeout=settings.round_timeout + 240)


def test_one_round_equals_fit_with_the_local_backend(model_file, tmp_path):
    # Nobody drops here: the timeout only bounds a failure (the round ends when the replies are in).
    settings = _settings(model_file, tmp_path, round_timeout=240.0)
    rows = _run(settings, tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert row["clients_sampled"] == row["clients_responded"] == 3 and row["clients_dropped"] == 0
    federated = load_file(settings.save)

    # The same round in this process: same initial model, same assignment, same client batches.
    torch.manual_seed(settings.seed)
    loaded = load_model_file(model_file)
    ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, **settings.compile)
    before = {n: t.clone() for n, t in ist.model.state_dict().items()}
    train, _ = datasets(loaded, "auto", settings.seed)
    partition_of_slot = {slot: int(part) for part, slot in row["slots"].items()}
    assert sorted(partition_of_slot) == [0, 1, 2]  # three clients, three slots: one each

    def slot_batches(slot: int):
        p = partition_of_slot[slot]
        indices = client_indices(train, p, settings.clients, None, settings.seed)
        return ClientBatches(train, indices, settings.batch_size, settings.seed, p).take(0, settings.local_steps)

    fit(ist, slot_batches, rounds=1, local_steps=settings.local_steps,
        optimizer=TrainingRecipe(**settings.optimizer).build, backend="local", progress=False)
    reference = ist.model.state_dict()
    assert set(federated) == set(reference)
    for name, value in reference.items():
        assert not torch.equal(value, before[name]), f"{name} did not train"
        torch.testing.assert_close(federated[name], value, rtol=0, atol=1e-12, msg=name)

    # A client held only its subnet's tensors: its parameters are the slot's, fewer than the model's.
    full = ist.plan.parameters_full
    for client in row["clients"]:
        assert client["full_elements"] == full
        assert client["held_elements"] == ist.plan.parameters_per_subnet[client["slot"]] < full
        assert client["bytes_down"] < sum(t.numel() * t.element_size() for t in before.values())


def test_a_client_killed_mid_round_is_dropped_and_the_round_completes(model_file, tmp_path):
    settings = _settings(model_file, tmp_path, clients=3, rounds=1, round_timeout=60.0)
    rows = _run(settings, tmp_path, node_env={1: {"ISTFX_TEST_DIE": "1"}})
    row = rows[0]
    assert row["clients_sampled"] == 3
    assert row["clients_responded"] == 2 and row["clients_dropped"] == 1
    assert "1" not in row["slots"]  # partition 1 died
    assert len(row["dropped"]) == 1 and "no reply" in row["dropped"][0]["reason"]
    dead_slot = row["dropped"][0]["slot"]
    assert sorted(row["slots"].values()) == sorted({0, 1, 2} - {dead_slot})
    assert list(row["units_kept"]) == [str(dead_slot)]
    assert row["val_loss"] is not None
    # The dead client's units keep their values; the others trained.
    torch.manual_seed(settings.seed)
    loaded = load_model_file(model_file)
    ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, **settings.compile)
    assert row["units_kept"][str(dead_slot)] == sum(ist.plan.counts(ist.plan.groups[g])[dead_slot]
                                                   for g in ist.plan.split)
    before, after = ist.model.state_dict()["0.weight"], load_file(settings.save)["0.weight"]
    rows = ist.slices(0).indices
    assert torch.equal(after[rows[dead_slot]["0.weight"][0]], before[rows[dead_slot]["0.weight"][0]])
    for slot in set(range(3)) - {dead_slot}:
        assert not torch.equal(after[rows[slot]["0.weight"][0]], before[rows[slot]["0.weight"][0]])
