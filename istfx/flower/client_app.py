"""The Flower ClientApp: trains the subnet (IST) or the full model (FedAvg) it receives, on its own data.

IST: the client loads the model file on the ``meta`` device (no weights),
compiles it once per process (cached) to the same plan as the server, checks
the received :class:`~istfx.flower.wire.SubnetDescription` against it,
instantiates the slot's subnet template around the received tensors (the
only real tensors it ever holds), takes ``local-steps`` optimizer steps on
its partition and replies with the trained slices and its measurements.
FedAvg: it builds the model for real, loads the received full state, trains
and replies with the full state.

The SuperNode gives each client its partition through its node config:
``--node-config 'partition-id=3 num-partitions=16'``.

Reply metrics (``MetricRecord`` "metrics"): ``num-examples``, ``train-loss``,
``partition-id``, ``slot``, ``bytes-down``, ``bytes-up``, ``peak-memory``
(bytes, the process's maximum resident set), ``compute-seconds``,
``held-elements`` (parameter elements the client held) and
``full-elements`` (the full model's).

Usage (what ``istfx fl`` writes into its app folder)::

    from istfx.cli.loader import load_model_file
    from istfx.flower.client_app import make_client_app
    app = make_client_app(load_model_file, Path(__file__).parent)
"""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from istfx.errors import ISTError
from istfx.flower.data import ClientBatches, LoadedModelFile, client_dataset
from istfx.flower.local import train_steps
from istfx.flower.settings import FederatedSettings
from istfx.flower.wire import SubnetDescription, WireError, payload_bytes, record_to_tensors, tensors_to_record

__all__ = ["ClientState", "make_client_app", "peak_memory_bytes", "train_ist", "train_fedavg"]

ModelLoader = Callable[..., LoadedModelFile]  # load_model_file(path, meta=False)
_POSITION_KEY = "istfx-batches"


def peak_memory_bytes() -> int:
    """The process's peak resident memory in bytes (``ru_maxrss``; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class ClientState:
    """What a client process keeps between messages: the compiled plan and its data (built once).

    Args:
        load_model: the model-file loader (``istfx.cli.loader.load_model_file``).
        app_dir: the app's folder (relative model paths are taken from there).
    """

    def __init__(self, load_model: ModelLoader, app_dir: str | Path | None = None) -> None:
        self.load_model = load_model
        self.app_dir = app_dir
        self._compiled: dict[tuple, Any] = {}
        self._data: dict[tuple, tuple[Any, Any]] = {}

    def compiled(self, settings: FederatedSettings):
        """The model compiled on the meta device with the run's compile options (once per process)."""
        key = (str(settings.model_path(self.app_dir)), repr(sorted(settings.compile.items())), settings.seed)
        if key not in self._compiled:
            import istfx

            torch.manual_seed(settings.seed)
            loaded = self.load_model(settings.model_path(self.app_dir), meta=True)
            with contextlib.redirect_stdout(sys.stderr):
                ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, **settings.compile)
            self._compiled[key] = (ist, loaded)
        return self._compiled[key]

    def loaded(self, settings: FederatedSettings, meta: bool) -> LoadedModelFile:
        """The model file, loaded on the meta device (IST) or for real (FedAvg; not cached)."""
        if meta:
            return self.compiled(settings)[1]
        torch.manual_seed(settings.seed)
        return self.load_model(settings.model_path(self.app_dir))

    def batches(self, settings: FederatedSettings, loaded: LoadedModelFile, partition: int,
                partitions: int) -> ClientBatches:
        """This client's batches: its partition of the training set."""
        key = (str(settings.model_path(self.app_dir)), settings.data, settings.seed, settings.dirichlet,
               partition, partitions, settings.batch_size)
        if key not in self._data:
            train, indices = client_dataset(loaded, settings.data, partition, partitions, settings.dirichlet,
                                            settings.seed)
            self._data[key] = (train, ClientBatches(train, indices, settings.batch_size, settings.seed, partition))
        return self._data[key][1]


def _partition(context: Context) -> tuple[int, int]:
    config = context.node_config
    try:
        partition, partitions = int(config["partition-id"]), int(config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ISTError("this SuperNode has no data partition: start it with --node-config "
                       "'partition-id=K num-partitions=N'.") from None
    return partition, partitions


def _take_batches(context: Context, batches: ClientBatches, count: int) -> list[Any]:
    """The next `count` batches of this client, continuing from the position kept in its context."""
    state = context.state
    position = int(state[_POSITION_KEY]["position"]) if _POSITION_KEY in state else 0
    state[_POSITION_KEY] = ConfigRecord({"position": position + count})
    return batches.take(position, count)


def _loss_fn(loaded: LoadedModelFile):
    return loaded.value("loss_fn") or torch.nn.functional.cross_entropy


def _recipe(settings: FederatedSettings):
    from istfx.runtime.optimizers import TrainingRecipe

    return TrainingRecipe(**settings.optimizer)


def train_ist(state: ClientState, settings: FederatedSettings, description: SubnetDescription,
              arrays: ArrayRecord, batches: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the received subnet on `batches`; returns (trained tensors by name, metrics).

    The client never holds the full model: its model is on the meta device,
    and the subnet is built only from the received tensors.
    """
    ist, loaded = state.compiled(settings)
    description.check(ist)
    plan = ist.plan
    template = ist.template(description.slot, description.held_blocks)
    slices = ist.slices(description.round)
    expected = {n: (slices.held_shape(n, plan.state_shapes[n], description.slot), ist.state_tensor(n).dtype)
                for n in plan.state_kinds if n in template.used}
    received = record_to_tensors(arrays, expected)
    requires_grad = {n: p.requires_grad for n, p in ist.model.named_parameters()}
    subnet = template.instantiate(received, requires_grad)
    parameters = list(dict.fromkeys(p for p in subnet.parameters() if p.requires_grad))
    if any(p.is_meta for p in subnet.parameters()):
        raise ISTError("internal: a subnet parameter has no received value (it is still on the meta device).")
    result = train_steps(subnet, parameters, batches, _recipe(settings).build, _loss_fn(loaded))
    named = dict(subnet.named_parameters())
    named.update(subnet.named_buffers())
    trained = {n: named[n].detach() for n in ist.trainable_state if n in named}
    full = plan.parameters_full
    metrics = {
        "num-examples": result.samples, "train-loss": result.loss, "slot": description.slot,
        "bytes-down": payload_bytes(received), "bytes-up": payload_bytes(trained),
        "compute-seconds": result.seconds, "held-elements": sum(p.numel() for p in subnet.parameters()),
        "full-elements": full,
    }
    return trained, metrics


def train_fedavg(state: ClientState, settings: FederatedSettings, arrays: ArrayRecord,
                 batches: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the full model received as a state dict on `batches`; returns (trained state, metrics)."""
    loaded = state.loaded(settings, meta=False)
    model = loaded.model
    own = model.state_dict()
    expected = {n: (tuple(t.shape), t.dtype) for n, t in own.items()}
    received = record_to_tensors(arrays, expected)
    model.load_state_dict(received)
    parameters = [p for p in model.parameters() if p.requires_grad]
    result = train_steps(model, parameters, batches, _recipe(settings).build, _loss_fn(loaded))
    trained = {n: t.detach() for n, t in model.state_dict().items()}
    metrics = {
        "num-examples": result.samples, "train-loss": result.loss, "slot": -1,
        "bytes-down": payload_bytes(received), "bytes-up": payload_bytes(trained),
        "compute-seconds": result.seconds, "held-elements": sum(p.numel() for p in model.parameters()),
        "full-elements": sum(p.numel() for p in model.parameters()),
    }
    return trained, metrics


def make_client_app(load_model: ModelLoader, app_dir: str | Path | None = None) -> ClientApp:
    """The istfx ClientApp; `load_model` is ``istfx.cli.loader.load_model_file`` (or one like it)."""
    app = ClientApp()
    state = ClientState(load_model, app_dir)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        begin = time.perf_counter()
        settings = FederatedSettings.from_run_config(context.run_config)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        partition, partitions = _partition(context)
        config = msg.content["config"] if "config" in msg.content else {}
        strategy = config.get("strategy", settings.strategy)
        if "arrays" not in msg.content:
            raise WireError("the train message holds no `arrays` record.")
        arrays = msg.content["arrays"]
        if strategy == "ist":
            description = SubnetDescription.from_config(config)
            loaded = state.compiled(settings)[1]
            batches = _take_batches(context, state.batches(settings, loaded, partition, partitions),
                                    settings.local_steps)
            torch.manual_seed(settings.seed * 1_000_003 + partition * 10_007 + description.round)
            trained, metrics = train_ist(state, settings, description, arrays, batches)
        elif strategy == "fedavg":
            loaded = state.loaded(settings, meta=False)
            batches = _take_batches(context, state.batches(settings, loaded, partition, partitions),
                                    settings.local_steps)
            trained, metrics = train_fedavg(state, settings, arrays, batches)
        else:
            raise WireError(f"unknown strategy {strategy!r} in the train message.")
        metrics.update({"partition-id": partition, "peak-memory": peak_memory_bytes(),
                        "wall-seconds": time.perf_counter() - begin})
        # A MetricRecord holds numbers; a loss without samples (nan) is left out rather than sent.
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
        content = RecordDict({"arrays": tensors_to_record(trained), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app
