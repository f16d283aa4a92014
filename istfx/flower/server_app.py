"""The Flower ServerApp: builds the global model, runs the IST (or FedAvg) strategy, evaluates, records.

Each round ends with the server evaluating the full model on the model
file's ``eval_data()`` (the digits' test split by default) and writing one
JSON line to the run config's ``metrics`` file::

    {"round", "strategy", "val_loss", "val_accuracy", "clients_sampled", "clients_responded",
     "clients_dropped", "bytes_down_per_client", "bytes_up_per_client", "bytes_total",
     "client_peak_memory_bytes", "client_compute_seconds", "elapsed_s", ...}

``round`` counts from 1 (Flower's server rounds); bytes are tensor payload
bytes (means over the clients that responded; ``bytes_total`` is every byte
sent down plus every byte that came back); ``client_peak_memory_bytes`` is the
largest client process's peak resident memory and ``client_compute_seconds``
the mean local-training time. Extra keys: ``train_loss``, ``slots``
(partition -> slot), ``dropped`` (node, slot and reason of each client left
out), ``units_kept`` (slot -> units that kept their previous values because no
client returned the slot) and ``clients`` (each responding client's
partition, slot, bytes, samples and parameter elements held).

Usage (what ``istfx fl`` writes into its app folder)::

    from istfx.cli.loader import load_model_file
    from istfx.flower.server_app import make_server_app
    app = make_server_app(load_model_file, Path(__file__).parent)
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from istfx.errors import ISTError
from istfx.flower.data import LoadedModelFile, datasets
from istfx.flower.settings import FederatedSettings
from istfx.flower.strategy import ISTStrategy, RecordingFedAvg, RoundStats

__all__ = ["MetricsWriter", "make_server_app", "wait_for_nodes"]

log = logging.getLogger("istfx.flower")
ModelLoader = Callable[..., LoadedModelFile]


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Wait until `count` SuperNodes are connected (at most `timeout` seconds); returns their ids."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise ISTError(f"only {len(nodes)} of {count} clients connected within {timeout:g} s.")
        time.sleep(0.2)


class MetricsWriter:
    """Appends one JSON row per round to a file (when given) and prints a progress line."""

    def __init__(self, path: str | None, strategy: str, rounds: int) -> None:
        self.path = Path(path) if path else None
        self.strategy = strategy
        self.rounds = rounds
        self.start = time.monotonic()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, round: int, evaluation: dict[str, Any] | None, stats: RoundStats | None) -> dict:
        """Write round `round`'s row (evaluation of the full model + the round's client numbers)."""
        row = {"round": round, "strategy": self.strategy,
               "val_loss": None if evaluation is None else evaluation["loss"],
               "val_accuracy": None if evaluation is None else evaluation["accuracy"]}
        row.update(stats.row() if stats is not None else {})
        row["elapsed_s"] = time.monotonic() - self.start
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        acc = row["val_accuracy"]
        print(f"istfx fl: round {round}/{self.rounds}  val loss "
              f"{'-' if row['val_loss'] is None else format(row['val_loss'], '.4f')}  val acc "
              f"{'-' if acc is None else format(acc, '.4f')}  clients {row.get('clients_responded')}/"
              f"{row.get('clients_sampled')}  {row['elapsed_s']:.1f}s", flush=True)
        return row


def make_server_app(load_model: ModelLoader, app_dir: str | Path | None = None) -> ServerApp:
    """The istfx ServerApp; `load_model` is ``istfx.cli.loader.load_model_file`` (or one like it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = FederatedSettings.from_run_config(context.run_config)
        run(grid, settings, load_model, app_dir)

    return app


def run(grid: Grid, settings: FederatedSettings, load_model: ModelLoader,
        app_dir: str | Path | None = None) -> None:
    """Run a federated training on `grid` as `settings` say; writes metrics and the final model."""
    from torch.utils.data import DataLoader

    from istfx.runtime.training import evaluate

    logging.getLogger("istfx.flower").setLevel(logging.INFO)
    if not logging.getLogger("istfx.flower").handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("istfx fl: %(message)s"))
        logging.getLogger("istfx.flower").addHandler(handler)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    loaded = load_model(settings.model_path(app_dir))
    _, test = datasets(loaded, settings.data, settings.seed)
    eval_batches = loaded.function("eval_batches")
    eval_data = eval_batches() if eval_batches else (DataLoader(test, batch_size=512) if test is not None else None)
    loss_fn = loaded.value("loss_fn") or torch.nn.functional.cross_entropy
    wait_for_nodes(grid, settings.clients, timeout=max(60.0, settings.round_timeout))
    writer = MetricsWriter(settings.metrics, settings.strategy, settings.rounds)
    train_config = ConfigRecord({"strategy": settings.strategy})

    if settings.strategy == "ist":
        import istfx

        with contextlib.redirect_stdout(sys.stderr):
            ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, **settings.compile)
        strategy = ISTStrategy(ist, participation=settings.participation, seed=settings.seed,
                               round_timeout=settings.round_timeout)
        model = ist.model

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            result = evaluate(model, eval_data, loss_fn) if eval_data is not None else None
            row = writer.write(server_round, result, strategy.stats.get(server_round))
            return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})

        initial = ArrayRecord()
    else:
        model = loaded.model
        count = max(1, int(settings.participation * settings.clients + 0.5))
        strategy = RecordingFedAvg(fraction_train=settings.participation, fraction_evaluate=0.0,
                                   min_train_nodes=count, min_available_nodes=settings.clients,
                                   seed=settings.seed, round_timeout=settings.round_timeout)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            result = evaluate(model, eval_data, loss_fn) if eval_data is not None else None
            row = writer.write(server_round, result, strategy.stats.get(server_round))
            return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})

        initial = ArrayRecord(torch_state_dict=model.state_dict())

    strategy.start(grid, initial, num_rounds=settings.rounds, timeout=settings.round_timeout,
                   train_config=train_config, evaluate_fn=evaluate_fn)
    if settings.save:
        from istfx.runtime import checkpoint

        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        checkpoint.atomic_save(state, settings.save)
        print(f"istfx fl: wrote the trained model to {settings.save}", flush=True)
