"""``istfx fl``: federated IST on Flower's deployment engine, on this machine.

One command starts a SuperLink and ``--clients`` SuperNodes as local
processes on 127.0.0.1 (free ports; plain HTTP only on loopback, TLS with
``--tls-dir`` or the certificate flags), writes a Flower app folder for the
model file, runs it with ``flwr run``, prints one line per round, and stops
every process it started, also on errors and Ctrl-C::

    istfx fl examples/models/mlp_digits.py --clients 8 --subnets 4 --rounds 3
    istfx fl model.py --clients 16 --subnets 4 --participation 0.25 --dirichlet 0.5 --metrics fl.jsonl
    istfx fl model.py --clients 16 --strategy fedavg            # Flower's FedAvg, the full model everywhere

``--write-app DIR`` only writes the app folder (the model file copied in);
``flwr run DIR SUPERLINK`` then runs it on a real federation whose
SuperNodes were started with ``--node-config 'partition-id=K num-partitions=N'``.
The model file contract is :mod:`istfx.cli.loader`'s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from istfx.cli import options
from istfx.cli.loader import MODEL_FILE_HELP
from istfx.errors import ISTError

__all__ = ["EPILOG", "configure", "run", "settings_from_args"]

EXIT_ERROR = 2

EPILOG = MODEL_FILE_HELP + """
  train_data() / eval_data() (optional) datasets of (input, label) pairs; the
                   digits otherwise. Each client trains on its own partition
                   of train_data() (--dirichlet); the server evaluates the
                   full model on eval_data().

output:
  One line per round (validation loss and accuracy of the full model, clients
  that responded); with --metrics one JSON row per round: round (from 1),
  strategy, val_loss, val_accuracy, clients_sampled, clients_responded,
  clients_dropped, bytes_down_per_client, bytes_up_per_client, bytes_total,
  client_peak_memory_bytes, client_compute_seconds, elapsed_s.

examples:
  istfx fl examples/models/mlp_digits.py --clients 8 --subnets 4 --rounds 3
  istfx fl examples/models/mlp_digits.py --clients 16 --participation 0.25 --dirichlet 0.5
  istfx fl examples/models/mlp_digits.py --clients 16 --strategy fedavg --metrics fedavg.jsonl
  istfx fl examples/models/mlp_digits.py --clients 4 --write-app fl-app/   # then: flwr run fl-app/ SUPERLINK

exit status: 0 when every round completed, 2 on a usage, model or federation error, 130 when interrupted
(Ctrl-C or SIGTERM)."""


def _alpha(text: str) -> float | None:
    if text.strip().lower() == "iid":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'iid', got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"alpha must be a finite number > 0, got {text!r}")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``istfx fl``: the compile options, the federation, local training, outputs."""
    options.add_compile_options(p)
    f = p.add_argument_group("federation")
    f.add_argument("--clients", type=options.positive_int, default=4, help="SuperNodes to start (default: 4)")
    f.add_argument("--rounds", type=options.positive_int, default=3, help="server rounds (default: 3)")
    f.add_argument("--strategy", choices=("ist", "fedavg"), default="ist",
                   help="ist: each client trains one subnet (default); fedavg: Flower's FedAvg, full model")
    f.add_argument("--participation", type=options.number(above=0.0), default=1.0, metavar="F",
                   help="fraction of the clients sampled each round (default: 1)")
    f.add_argument("--dirichlet", type=_alpha, default=None, metavar="ALPHA|iid",
                   help="label skew of the client partitions: Dirichlet alpha, or iid (default: iid)")
    f.add_argument("--round-timeout", type=options.number(above=0.0), default=600.0, metavar="SECONDS",
                   help="the server waits this long for a round's replies; later clients are dropped "
                        "(default: 600)")
    f.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="serve the SuperLink with TLS: DIR holds ca.crt, server.pem and server.key")
    f.add_argument("--ssl-ca-certfile", default=None, help="TLS CA certificate (with --ssl-certfile/--ssl-keyfile)")
    f.add_argument("--ssl-certfile", default=None, help="TLS server certificate")
    f.add_argument("--ssl-keyfile", default=None, help="TLS server key")
    f.add_argument("--write-app", default=None, metavar="DIR",
                   help="only write the Flower app folder (model file copied in) for `flwr run DIR SUPERLINK`")
    t = p.add_argument_group("local training (each client)")
    t.add_argument("--local-steps", type=options.positive_int, default=10, help="steps per round (default: 10)")
    t.add_argument("--batch-size", type=options.positive_int, default=32, help="batch size (default: 32)")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="inner optimizer (default: sgd)")
    t.add_argument("--lr", type=options.number(above=0.0), default=0.1, help="learning rate (default: 0.1)")
    t.add_argument("--momentum", type=options.number(minimum=0.0), default=0.9, help="SGD momentum (default: 0.9)")
    t.add_argument("--weight-decay", type=options.number(minimum=0.0), default=0.0, help="weight decay (default: 0)")
    t.add_argument("--data", choices=("auto", "digits"), default="auto",
                   help="auto: the file's train_data()/eval_data(), else the digits (default); digits")
    t.add_argument("--threads", type=options.positive_int, default=1, help="torch threads per process (default: 1)")
    o = p.add_argument_group("output")
    o.add_argument("--metrics", default=None, metavar="OUT.jsonl", help="per-round metrics as JSON lines")
    o.add_argument("--save", default=None, metavar="OUT.safetensors", help="write the trained model here")
    o.add_argument("--logs", default=None, metavar="DIR",
                   help="keep the SuperLink, SuperNode and flwr run logs here (default: a temporary folder)")
    o.add_argument("-q", "--quiet", action="store_true", help="no per-round lines (errors only)")


def settings_from_args(args: argparse.Namespace, model: str, metrics: str | None):
    """The run's :class:`~istfx.flower.settings.FederatedSettings` from parsed options."""
    from istfx.flower.settings import FederatedSettings

    compile_kwargs = options.compile_kwargs(args)
    return FederatedSettings(
        model=model, strategy=args.strategy, compile=compile_kwargs, rounds=args.rounds, clients=args.clients,
        participation=args.participation, local_steps=args.local_steps, batch_size=args.batch_size,
        optimizer={"optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum,
                   "weight_decay": args.weight_decay},
        dirichlet=args.dirichlet, seed=args.seed, round_timeout=args.round_timeout, data=args.data,
        metrics=metrics, save=str(Path(args.save).resolve()) if args.save else None, threads=args.threads)


def _tls(args: argparse.Namespace):
    from istfx.flower.federation import TlsFiles

    flags = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if args.tls_dir and any(flags):
        raise ISTError("give either --tls-dir or the three --ssl-* files, not both.")
    if args.tls_dir:
        return TlsFiles.from_dir(args.tls_dir)
    if any(flags):
        if not all(flags):
            raise ISTError("TLS needs all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile.")
        files = TlsFiles(Path(args.ssl_ca_certfile).resolve(), Path(args.ssl_certfile).resolve(),
                         Path(args.ssl_keyfile).resolve())
        files.check()
        return files
    return None


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run ``istfx fl`` for parsed `args`; returns the exit status."""
    model = Path(args.model)
    if not model.is_file():
        raise ISTError(f"model file not found: {model}")
    if args.write_app:
        from istfx.flower.federation import write_app

        settings = settings_from_args(args, model.name, None)
        write_app(args.write_app, settings.to_run_config(), model_file=model)
        print(f"istfx fl: wrote the Flower app to {args.write_app}; run it with `flwr run {args.write_app} "
              "SUPERLINK` (SuperNodes need --node-config 'partition-id=K num-partitions=N')", flush=True)
        return 0
    tls = _tls(args)
    _remove_orphaned_folders(Path(tempfile.gettempdir()))
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as tmp:
        (Path(tmp) / _OWNER_FILE).write_text(str(os.getpid()))
        logs = Path(args.logs).resolve() if args.logs else Path(tmp) / "logs"
        metrics = str(Path(args.metrics).resolve()) if args.metrics else str(Path(tmp) / "metrics.jsonl")
        settings = settings_from_args(args, str(model.resolve()), metrics)
        return _run_federation(args, settings, tls, logs, Path(tmp) / "app")


class _sigterm_as_interrupt:
    """While active (in the main thread), SIGTERM raises KeyboardInterrupt, so ``kill PID`` stops the
    federation the way Ctrl-C does: its processes are stopped, its temporary folder removed, exit status 130."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._interrupt)

    @staticmethod
    def _interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


_TMP_PREFIX = "istfx-fl-"
_OWNER_FILE = "owner.pid"


def _remove_orphaned_folders(tmp_root: Path) -> None:
    """Remove the temporary folders of ``istfx fl`` runs whose launcher was killed (``kill -9`` leaves them; its
    Flower processes die with it through the parent-death signal)."""
    from istfx.runtime.launch import process_alive

    for folder in tmp_root.glob(_TMP_PREFIX + "*"):
        try:
            owner = int((folder / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        if not process_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)


def _run_federation(args: argparse.Namespace, settings, tls, logs: Path, app_dir: Path) -> int:
    from istfx.flower.federation import LocalFederation, write_app

    say = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
    write_app(app_dir, settings.to_run_config())
    Path(settings.metrics).unlink(missing_ok=True)
    begin = time.monotonic()
    say(f"istfx fl {args.model}: {settings.strategy}, {args.clients} clients, "
        f"{settings.subnets} subnet(s), {args.rounds} rounds, participation {args.participation:g}, "
        f"{'iid' if args.dirichlet is None else f'dirichlet {args.dirichlet:g}'}, "
        f"{'TLS' if tls else 'plain HTTP on 127.0.0.1'}")
    with LocalFederation(args.clients, logs, tls=tls, threads=args.threads) as federation:
        say(f"istfx fl: SuperLink on {federation.address}, {args.clients} SuperNodes started "
            f"({time.monotonic() - begin:.1f}s); logs in {logs}")
        rows = federation.run_app(app_dir, settings.metrics, args.rounds,
                                  timeout=120 + args.rounds * (args.round_timeout + 60),
                                  on_row=lambda row: _show(row, say))
    _summary(rows, settings, time.monotonic() - begin, say)
    return 0


def _show(row: dict, say) -> None:
    """Print one round's line (and the clients dropped)."""
    acc, loss = row.get("val_accuracy"), row.get("val_loss")
    line = (f"round {row['round']:4d}  val loss {'-' if loss is None else format(loss, '.4f')}"
            f"  val acc {'-' if acc is None else format(acc, '.4f')}"
            f"  clients {row.get('clients_responded')}/{row.get('clients_sampled')}"
            f"  down {_mb(row.get('bytes_down_per_client'))} up {_mb(row.get('bytes_up_per_client'))} MB/client"
            f"  {row.get('elapsed_s', 0):.1f}s")
    for drop in row.get("dropped") or []:
        line += f"\n    dropped: node {drop['node']} (slot {drop['slot']}): {drop['reason']}"
    say(line)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.3f}"


def _summary(rows: list[dict], settings, seconds: float, say) -> None:
    last = rows[-1]
    acc = last.get("val_accuracy")
    down = sum(r.get("bytes_down_per_client") or 0 for r in rows)
    say(f"done: {len(rows)} rounds in {seconds:.1f}s, final val accuracy {'-' if acc is None else format(acc, '.4f')}, "
        f"{_mb(down)} MB down per client in all, dropped clients {sum(r.get('clients_dropped', 0) for r in rows)}")
    if settings.save:
        say(f"istfx fl: wrote the trained model to {settings.save}")
