"""istfx.flower in one process (no Flower processes): records, descriptions, settings, partitions, the client
step on a meta-device plan, and the strategy's dealing and reassembly."""
from __future__ import annotations

import textwrap

import flwr  # noqa: F401  (the fl extra)
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import istfx
from istfx.cli.loader import load_model_file
from istfx.errors import ISTError
from istfx.flower.client_app import ClientState, train_ist
from istfx.flower.data import ClientBatches, client_dataset, client_indices
from istfx.flower.settings import FederatedSettings
from istfx.flower.strategy import ISTStrategy, RecordingFedAvg, deal_slots, sample_clients
from istfx.flower.wire import (
    SubnetDescription,
    WireError,
    describe,
    plan_fingerprint,
    record_to_tensors,
    tensors_to_record,
)
from istfx.runtime.federated_data import dirichlet_label_partition

MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    def build_model():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()


    example_inputs = (torch.randn(4, 6, dtype=torch.float64),)


    def train_data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(60, 6, generator=g, dtype=torch.float64)
        return TensorDataset(x, x[:, :3].argmax(1))
''')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wire") / "wire_mlp.py"
    path.write_text(MODEL)
    return path


@pytest.fixture(scope="module")
def server(model_file):
    torch.manual_seed(0)
    loaded = load_model_file(model_file)
    return istfx.compile(loaded.model, example_inputs=loaded.example_inputs, subnets=2, seed=0)


# -- records ------------------------------------------------------------------------------------
def test_tensors_round_trip_through_an_array_record():
    tensors = {"a.weight": torch.randn(3, 4, dtype=torch.float64), "n": torch.tensor(7)}
    back = record_to_tensors(tensors_to_record(tensors), {"a.weight": ((3, 4), torch.float64), "n": ((), torch.int64)})
    assert torch.equal(back["a.weight"], tensors["a.weight"]) and back["a.weight"].dtype == torch.float64
    assert int(back["n"]) == 7


@pytest.mark.parametrize("expected, message", [
    ({"w": ((3, 4), torch.float64), "b": ((4,), torch.float64)}, "missing"),
    ({}, "unexpected"),
    ({"w": ((4, 3), torch.float64)}, "shape"),
    ({"w": ((3, 4), torch.float32)}, "float32"),
])
def test_record_to_tensors_refuses_what_the_subnet_does_not_hold(expected, message):
    record = tensors_to_record({"w": torch.zeros(3, 4, dtype=torch.float64)})
    with pytest.raises(WireError, match=message):
        record_to_tensors(record, expected)


def test_record_to_tensors_refuses_non_finite_values():
    record = tensors_to_record({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(WireError, match="non-finite"):
        record_to_tensors(record, {"w": ((2,), torch.float32)})


# -- descriptions ----------------------------------------------------------------------------------
def test_description_round_trips_through_a_config_record(server):
    description = describe(server, round=3, slot=1)
    back = SubnetDescription.from_config(ConfigRecord(description.to_config()))
    assert back == description
    back.check(server)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("fingerprint"), "lacks fingerprint"),
    (lambda c: c.update(slot="1"), "malformed"),
    (lambda c: c.update(round=-1), "negative"),
    (lambda c: c.update(sizes=[0]), "empty"),
])
def test_malformed_descriptions_are_refused(server, change, message):
    config = describe(server, 0, 0).to_config()
    change(config)
    with pytest.raises(WireError, match=message):
        SubnetDescription.from_config(config)


def test_a_description_of_another_plan_or_slot_is_refused(server, model_file):
    torch.manual_seed(0)
    loaded = load_model_file(model_file)
    other = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, subnets=3, seed=0)
    assert plan_fingerprint(other) != plan_fingerprint(server)
    with pytest.raises(WireError, match="plan"):
        describe(server, 0, 0).check(other)
    good = describe(server, 0, 1)
    with pytest.raises(WireError, match="does not exist"):
        SubnetDescription(0, 5, good.sizes, (), good.fingerprint).check(server)
    with pytest.raises(WireError, match="units per split group"):
        SubnetDescription(0, 1, tuple(s + 1 for s in good.sizes), (), good.fingerprint).check(server)


# -- settings ------------------------------------------------------------------------------------
def test_settings_round_trip_through_the_run_config():
    settings = FederatedSettings(model="m.py", compile={"subnets": 4, "policy": "rolling", "sizes": None},
                                 dirichlet=0.5, metrics=None, clients=16, participation=0.25)
    config = settings.to_run_config()
    assert all(isinstance(v, (str, int, float, bool)) for v in config.values())
    assert FederatedSettings.from_run_config(config) == settings
    assert FederatedSettings.from_run_config({**config, "dirichlet": "iid"}).dirichlet is None


@pytest.mark.parametrize("config, message", [
    ({"model": "m.py", "bogus": 1}, "unknown run-config keys"),
    ({"strategy": "ist"}, "needs `model`"),
    ({"model": "m.py", "strategy": "fedprox"}, "strategy must be"),
    ({"model": "m.py", "participation": 0.0}, "participation"),
    ({"model": "m.py", "compile": "{not json"}, "not valid JSON"),
])
def test_bad_run_configs_are_refused(config, message):
    with pytest.raises(ISTError, match=message):
        FederatedSettings.from_run_config(config)


# -- partitions ----------------------------------------------------------------------------------
def test_client_indices_are_the_label_partition_of_the_training_labels():
    labels = torch.arange(200) % 5
    data = torch.utils.data.TensorDataset(torch.randn(200, 3), labels)
    for alpha in (None, 0.1):
        parts = [client_indices(data, c, 4, alpha, seed=3) for c in range(4)]
        assert sorted(torch.cat(parts).tolist()) == list(range(200))
        expected = dirichlet_label_partition(labels, 4, alpha, 3)
        assert all(torch.equal(p, e) for p, e in zip(parts, expected))
    with pytest.raises(ISTError, match="partition-id"):
        client_indices(data, 4, 4, 0.5, 0)


def test_a_model_files_client_data_replaces_the_dirichlet_partition(tmp_path, model_file):
    path = tmp_path / "own_clients.py"
    path.write_text(MODEL + textwrap.dedent('''

        def client_data(client, clients, seed=0):
            x = torch.full((3 + client, 6), float(client * 100 + clients * 10 + seed), dtype=torch.float64)
            return TensorDataset(x, torch.zeros(3 + client, dtype=torch.int64))
    '''))
    loaded = load_model_file(path)
    data, indices = client_dataset(loaded, "auto", 2, 4, 0.1, seed=1)
    assert len(data) == 5 and indices.tolist() == [0, 1, 2, 3, 4]
    assert torch.all(data.tensors[0] == 241.0)  # client 2 of 4, seed 1: the file's own split, not --dirichlet's
    batch = ClientBatches(data, indices, 2, 0, 2).batch(0)
    assert batch[0].shape == (2, 6) and torch.all(batch[0] == 241.0)
    # without client_data: the Dirichlet partition of train_data()
    plain = load_model_file(model_file)
    train, indices = client_dataset(plain, "auto", 1, 3, 0.5, seed=0)
    assert len(train) == 60 and torch.equal(indices, client_indices(train, 1, 3, 0.5, 0))
    with pytest.raises(ISTError, match="partition-id"):
        client_dataset(loaded, "auto", 4, 4, None, 0)


def test_client_batches_continue_from_any_position():
    data = torch.utils.data.TensorDataset(torch.arange(50).double()[:, None], torch.arange(50) % 3)
    batches = ClientBatches(data, np.arange(0, 50, 2), batch_size=4, seed=1, client=2)
    run = batches.take(0, 14)  # crosses an epoch (25 samples: 6 batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run[5:], batches.take(5, 9)))
    first_epoch = torch.cat([b[0] for b in run[:6]]).flatten().long()
    assert len(set(first_epoch.tolist())) == 24 and all(v % 2 == 0 for v in first_epoch.tolist())


# -- the client and the strategy ------------------------------------------------------------------
def _train_message(strategy: ISTStrategy, slot: int) -> tuple[ArrayRecord, SubnetDescription]:
    ist = strategy.ist
    slices = ist.slices(0)
    template = ist.template(slot, [])
    tensors = {n: slices.take(n, ist.state_tensor(n).detach(), slot) for n in ist.plan.state_kinds
               if n in template.used}
    return tensors_to_record(tensors), describe(ist, 0, slot)


def test_a_client_trains_its_subnet_from_the_received_tensors_only(server, model_file):
    settings = FederatedSettings(model=str(model_file), compile={"subnets": 2, "seed": 0}, local_steps=2,
                                 batch_size=8, optimizer={"optimizer": "sgd", "lr": 0.1, "momentum": 0.0})
    state = ClientState(load_model_file)
    strategy = ISTStrategy(server)
    arrays, description = _train_message(strategy, 1)
    ist, loaded = state.compiled(settings)
    train = loaded.function("train_data")()
    batches = ClientBatches(train, client_indices(train, 0, 2, None, 0), 8, 0, 0).take(0, 2)
    trained, metrics = train_ist(state, settings, description, arrays, batches)
    # The client's model has no storage: every real tensor it held came in the message.
    assert all(p.is_meta for p in ist.model.parameters())
    assert metrics["held-elements"] == server.plan.parameters_per_subnet[1] < metrics["full-elements"]
    assert metrics["bytes-down"] == sum(arrays[n].numpy().nbytes for n in arrays.keys())
    sent = record_to_tensors(arrays, {n: (None, t.dtype) for n, t in trained.items()})
    assert set(trained) <= set(sent)
    assert any(not torch.equal(trained[n], sent[n]) for n in trained)
    with pytest.raises(WireError, match="expected"):
        bad = tensors_to_record({n: torch.zeros(2, 2, dtype=torch.float64) for n in arrays.keys()})
        train_ist(state, settings, description, bad, batches)


def test_sampling_and_dealing():
    nodes = [50, 10, 40, 30, 20, 60, 70, 80]
    sampled = sample_clients(nodes, 0.25, seed=0, round=4)
    assert len(sampled) == 2 and set(sampled) <= set(nodes)
    assert sampled == sample_clients(list(reversed(nodes)), 0.25, seed=0, round=4)
    assert deal_slots([40, 10, 70], 2) == {40: 0, 10: 1, 70: 0}
    assert deal_slots([40, 10, 70], 2, capacity={40: 1, 10: 0, 70: 1, 20: 0}) == {40: 1, 10: 0, 70: 1}


def test_capacity_classes_stay_with_their_clients(model_file, task_identity):
    torch.manual_seed(0)
    loaded = load_model_file(model_file)
    ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, subnets=2, sizes=[0.7, 0.3])
    strategy = ISTStrategy(ist, participation=0.5, seed=1)
    seen = {}
    for round in (1, 2, 3, 4):
        grid = _Grid([5, 9, 7, 3] if round < 3 else [5, 9, 3, 11])  # node 7 leaves, node 11 joins
        strategy.configure_train(round, ArrayRecord(), ConfigRecord(), grid)
        for client in strategy.stats[round].clients:
            assert seen.setdefault(client.node, client.slot) == client.slot
    assert strategy.capacity == {3: 0, 5: 1, 7: 0, 9: 1, 11: 0}



def test_fedavg_samples_the_clients_ist_samples(model_file, task_identity):
    loaded = load_model_file(model_file)
    ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, subnets=2)
    nodes = [11, 5, 9, 7, 3, 13, 2, 8]
    ist_strategy = ISTStrategy(ist, participation=0.25, seed=3)
    fedavg = RecordingFedAvg(fraction_train=0.25, fraction_evaluate=0.0, min_available_nodes=len(nodes), seed=3)
    arrays = ArrayRecord(loaded.model.state_dict())
    per_round = []
    for round in (1, 2, 3, 4):
        ist_strategy.configure_train(round, ArrayRecord(), ConfigRecord(), _Grid(nodes))
        messages = list(fedavg.configure_train(round, arrays, ConfigRecord(), _Grid(nodes)))
        ist_nodes = [c.node for c in ist_strategy.stats[round].clients]
        assert [m.metadata.dst_node_id for m in messages] == ist_nodes
        assert [c.node for c in fedavg.stats[round].clients] == ist_nodes
        assert messages[0].content["config"]["server-round"] == round
        per_round.append(tuple(ist_nodes))
    assert len(set(per_round)) > 1  # the sample changes from round to round
    other = RecordingFedAvg(fraction_train=0.25, fraction_evaluate=0.0, min_available_nodes=len(nodes), seed=4)
    others = [tuple(m.metadata.dst_node_id for m in other.configure_train(r, arrays, ConfigRecord(), _Grid(nodes)))
              for r in (1, 2, 3, 4)]
    assert others != per_round


@pytest.fixture
def task_identity():
    """Flower's messages read the run's identity, which its processes set from the SuperLink."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply(message: Message, tensors: dict, samples: int, partition: int) -> Message:
    content = RecordDict({"arrays": tensors_to_record(tensors),
                          "metrics": MetricRecord({"num-examples": samples, "partition-id": partition,
                                                   "train-loss": 1.0, "peak-memory": 100, "compute-seconds": 0.5})})
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = message.metadata.dst_node_id  # the reply comes from the node the message went to
    reply = Message(content=content, reply_to=message)
    assert reply.metadata.src_node_id == message.metadata.dst_node_id
    return reply


def test_strategy_averages_clients_of_a_slot_and_keeps_units_of_a_dropped_slot(model_file, task_identity):
    torch.manual_seed(0)
    loaded = load_model_file(model_file)
    ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, subnets=2, seed=0)
    before = {n: t.detach().clone() for n, t in ist.model.state_dict().items()}
    strategy = ISTStrategy(ist, participation=1.0)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid([1, 2, 3])))
    slots = {m.metadata.dst_node_id: strategy.stats[1].clients[k].slot for k, m in enumerate(messages)}
    twice = [n for n, s in slots.items() if s == 0]
    assert len(twice) == 2 and list(slots.values()).count(1) == 1
    replies = []
    for value, node in zip((1.0, 4.0), twice):  # both slot-0 clients reply; the slot-1 client dies
        message = next(m for m in messages if m.metadata.dst_node_id == node)
        sent = record_to_tensors(message.content["arrays"], {n: (None, torch.float64) for n in
                                                             message.content["arrays"].keys()})
        replies.append(_reply(message, {n: torch.full_like(t, value) for n, t in sent.items()}, 10 * int(value),
                              int(node)))
    strategy.aggregate_train(1, replies)
    stats = strategy.stats[1]
    assert [c.dropped is not None for c in stats.clients].count(True) == 1
    assert stats.kept_previous == {1: sum(ist.plan.counts(ist.plan.groups[g])[1] for g in ist.plan.split)}
    slices = ist.slices(0)
    weight = ist.model.state_dict()["0.weight"]
    held0 = slices.indices[0]["0.weight"][0]
    held1 = slices.indices[1]["0.weight"][0]
    # slot 0's rows: the samples-weighted mean of its two clients, (10*1 + 40*4) / 50
    assert torch.allclose(weight[held0], torch.full_like(weight[held0], 170 / 50))
    # slot 1's rows: nobody returned them, they keep their values
    assert torch.equal(weight[held1], before["0.weight"][held1])


# -- the command line ------------------------------------------------------------------------------
def test_fl_help_and_argument_errors_import_neither_torch_nor_flower():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from istfx.cli import main\n"
        "for argv in (['fl', '--help'], ['fl', 'm.py', '--participation', '0'], ['fl', 'm.py', '--dirichlet', 'x']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules or 'flwr' in sys.modules else 'NEITHER', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().endswith("NEITHER"), proc.stderr[-2000:]
    assert "--participation" in proc.stdout and "--round-timeout" in proc.stdout and "--policy" in proc.stdout
    assert "--participation: must be a finite number > 0" in proc.stderr
    assert "expected a number > 0 or 'iid'" in proc.stderr


def test_write_app_gives_a_flower_app_whose_run_config_reads_back(tmp_path, model_file):
    import tomllib

    from istfx.cli.main import main

    assert main(["fl", str(model_file), "--clients", "16", "--subnets", "2", "--policy", "rolling",
                 "--participation", "0.25", "--dirichlet", "0.5", "--write-app", str(tmp_path / "app")]) == 0
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "istfx_fl_app.server:app", "clientapp": "istfx_fl_app.client:app"}
    settings = FederatedSettings.from_run_config(project["tool"]["flwr"]["app"]["config"])
    assert (settings.clients, settings.participation, settings.dirichlet) == (16, 0.25, 0.5)
    assert settings.compile["subnets"] == 2 and settings.compile["policy"] == "rolling"
    assert settings.model == model_file.name and (tmp_path / "app" / model_file.name).read_text() == MODEL
    assert settings.model_path(tmp_path / "app").is_file()


def test_tls_options_need_every_file(tmp_path, model_file, capsys):
    from istfx.cli.main import main

    assert main(["fl", str(model_file), "--ssl-certfile", "x.pem"]) == 2
    assert "needs all of --ssl-ca-certfile" in capsys.readouterr().err
    assert main(["fl", str(model_file), "--tls-dir", str(tmp_path)]) == 2
    assert "TLS files not found" in capsys.readouterr().err


def test_sigterm_stops_fl_as_ctrl_c_does(model_file, monkeypatch, capsys):
    import os
    import signal
    import time

    from istfx.cli import fl
    from istfx.cli.main import main

    seen = {}

    def federation(args, settings, tls, logs, app_dir):
        seen["tmp"] = app_dir.parent
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return 0

    monkeypatch.setattr(fl, "_run_federation", federation)
    before = signal.getsignal(signal.SIGTERM)
    begin = time.monotonic()
    assert main(["fl", str(model_file), "--clients", "2"]) == 130
    assert time.monotonic() - begin < 4
    assert not seen["tmp"].exists()  # the run's temporary folder is removed, as on Ctrl-C
    assert signal.getsignal(signal.SIGTERM) is before


def test_federation_processes_die_with_a_killed_launcher(tmp_path) -> None:
    """`kill -9` of the launcher: what it spawned (SuperLink, SuperNodes, flwr run) gets the parent-death signal."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, time
        from istfx.runtime.launch import die_with_this_process
        child = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=die_with_this_process())
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.05)
        assert not _running(child), "the launcher's child outlived it"
    finally:
        launcher.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_fl_removes_the_folders_of_killed_launchers(tmp_path) -> None:
    import subprocess

    from istfx.cli.fl import _remove_orphaned_folders

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan, live, foreign = (tmp_path / f"istfx-fl-{name}" for name in ("orphan", "live", "foreign"))
    for folder in (orphan, live, foreign):
        (folder / "logs").mkdir(parents=True)
    (orphan / "owner.pid").write_text(str(dead.pid))
    (live / "owner.pid").write_text(str(__import__("os").getpid()))
    _remove_orphaned_folders(tmp_path)
    assert not orphan.exists()
    assert live.exists() and foreign.exists()


def test_local_seconds_time_the_steps_not_the_optimizer_construction():
    from istfx.flower.local import train_steps

    model = torch.nn.Linear(3, 2)

    def slow_optimizer(parameters):
        import time
        time.sleep(0.5)  # stands in for a first optimizer's one-time torch._dynamo import
        return torch.optim.SGD(parameters, lr=0.1)

    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
    result = train_steps(model, list(model.parameters()), batches, slow_optimizer, torch.nn.functional.cross_entropy)
    assert result.steps == 2 and result.samples == 8
    assert result.seconds < 0.5
