"""``istfx train``: train a model file with IST, on this machine or on a cluster.

On this machine (the default) the command starts the ranks itself, gloo
over 127.0.0.1, nothing to set up::

    istfx train examples/models/mlp_digits.py --subnets 4 --rounds 30 --local-steps 10
    istfx train model.py --subnets 4 --topology sharded --compress int8 --metrics run.jsonl
    istfx train model.py --subnets 4 --backend local          # one process, subnets in turn

Every rank runs ``python -m istfx.cli.train`` with this command's arguments
unchanged; the launcher adds only torchrun's environment and, unless
``--init-from`` was given, ``--init-from`` with the initial model state it
wrote. On a cluster, run the same module under torchrun on every node; the
ranks read torchrun's environment and do the same thing::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m istfx.cli.train model.py --subnets 4 --topology sharded

Each rank uses its own shard of the training set
(:class:`istfx.runtime.data.ShardBatches`), so ``--backend local`` sees
exactly the batches the distributed run sees. Rank 0 prints one line per
round: training loss and accuracy (over the subnets' batches), test accuracy
of the full model, and the bytes each rank sent and received, next to what
data parallel (one all-reduce of the gradients per step) and local SGD (one
all-reduce of the model per round) would send for the same samples. Until
the first round the launcher says what the ranks are doing
(:mod:`istfx.cli.progress`).

The model file contract is :mod:`istfx.cli.loader`'s.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from istfx.cli import options
from istfx.cli.loader import ModelFile, load_model_file
from istfx.cli.progress import Phases, RankStatus, StartupMonitor
from istfx.errors import ISTError

__all__ = ["build_parser", "main", "rank_count", "run", "worker_argv"]

EXIT_ERROR = 2


# -- entry points ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m istfx.cli.train`` (what every rank runs): ``istfx train``'s options."""
    p = argparse.ArgumentParser(prog="python -m istfx.cli.train", description=__doc__, epilog=options.TRAIN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.configure_train(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istfx.cli.train ARGS``: ``istfx train ARGS``; returns the exit status."""
    from istfx.cli.main import report_error

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    options.check_backend_options(parser, args)
    try:
        return run(args, argv)
    except ISTError as exc:
        report_error(exc)
        return EXIT_ERROR


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``istfx train`` for parsed `args`; `argv` are the same arguments as given (the ranks get them)."""
    distributed = args.backend != "local"
    is_rank = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    _check_checkpoint_options(args)  # before any work: a bad --checkpoint-dir or nothing to --resume
    resuming = args.resume or args.resume_if_present
    if args.metrics and os.environ.get("RANK", "0") == "0" and not resuming and (is_rank or not distributed):
        Path(args.metrics).unlink(missing_ok=True)  # a fresh run starts a fresh metrics file
    if not distributed:
        return _train_local(args)
    if is_rank:
        return _rank(args, argv)
    return _launch(args, argv)


def _check_checkpoint_options(args: argparse.Namespace) -> None:
    """Refuse --checkpoint-dir naming a file, and --resume with nothing to resume (the library's errors)."""
    if args.checkpoint_dir is None:
        if args.resume or args.resume_if_present:
            raise ISTError("--resume needs --checkpoint-dir (where the checkpoints are).")
        return
    from istfx.runtime import checkpoint

    checkpoint.check_root(args.checkpoint_dir)
    if args.resume or args.resume_if_present:
        checkpoint.resumable(args.checkpoint_dir, if_present=args.resume_if_present)


def rank_count(args: argparse.Namespace) -> int:
    """Ranks a distributed run needs: one per subnet, times ``--data-parallel`` under DeepSpeed."""
    return args.subnets * (args.data_parallel if args.backend == "deepspeed" else 1)


def worker_argv(argv: Sequence[str], args: argparse.Namespace, init_from: str | None) -> list[str]:
    """The arguments of every rank: the command's own, plus the initial state the launcher wrote."""
    extra = ["--init-from", init_from] if init_from is not None and args.init_from is None else []
    return [*argv, *extra]


# -- the launcher ------------------------------------------------------------------------------
def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from istfx.runtime.launch import launch

    ranks = rank_count(args)
    phases = Phases(not args.quiet)
    phases.say(f"istfx train {args.model}: {args.subnets} subnets on {ranks} ranks, {_describe(args)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
    tolerant = args.backend == "torch" and args.topology == "ps"  # a dead worker leaves the ps job running
    with tempfile.TemporaryDirectory(prefix="istfx-train-") as tmp:
        init_from = None
        with phases.phase("loading model"):
            _make_backend(args)  # the backend's own checks, once, before any rank starts
            if args.init_from is None:
                init_from = _initial_state(args, tmp)
        monitor = StartupMonitor(tmp, ranks, os.path.join(tmp, "ready"), enabled=not args.quiet)
        monitor.begin()
        code = launch(worker_argv(argv, args, init_from), ranks, module="istfx.cli.train", threads=threads,
                      master_port=args.master_port, status_dir=tmp, monitor=monitor,
                      heartbeat_timeout=args.heartbeat_timeout or None,
                      tolerate=(lambda rank: rank != 0) if tolerant else (lambda rank: False))
        if monitor.report_errors():
            code = code or EXIT_ERROR
        if code != 0 and monitor.trained:  # a fault once training ran (not a set-up error): how to go on
            print(f"istfx: {resume_hint(args, argv)}", file=sys.stderr, flush=True)
    return code


def resume_hint(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """One line on how to go on after a failed run: ``--resume`` from the newest checkpoint when one exists."""
    import shlex

    strip = {"--resume", "--resume-if-present"}
    kept = [a for a in argv if a not in strip]
    command = "istfx train " + shlex.join(kept)
    if args.checkpoint_dir is None:
        return (f"no --checkpoint-dir was given, so there is nothing to resume from: rerun `{command}` "
                "(add --checkpoint-dir DIR to be able to resume).")
    newest = None
    with contextlib.suppress(Exception):
        from istfx.runtime import checkpoint

        newest = checkpoint.find(args.checkpoint_dir)
    if newest is None:
        return f"no checkpoint was completed in {args.checkpoint_dir} yet: rerun `{command}`."
    return (f"to resume from the newest checkpoint (round {newest.round + 1} done, {newest.path}): "
            f"`{command} --resume`")


def _initial_state(args: argparse.Namespace, directory: str) -> str:
    """Build the model once, seeded, and write its state for the ranks to read their rows from."""
    import torch

    from istfx.runtime import checkpoint

    torch.manual_seed(args.seed)
    model = load_model_file(args.model).model
    state, seen = {}, set()
    for name, value in model.state_dict(keep_vars=False).items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        state[name] = value.clone() if key in seen else value
        seen.add(key)
    path = os.path.join(directory, "init.safetensors")
    checkpoint.atomic_save(state, path)
    return path


def _make_backend(args: argparse.Namespace):
    if args.backend == "deepspeed":
        from istfx.backends import DeepSpeedBackend

        return DeepSpeedBackend(data_parallel=args.data_parallel, zero_stage=args.zero_stage,
                                gradient_accumulation=args.grad_accum, precision=args.precision,
                                init_from=args.init_from, timeout=args.timeout)
    from istfx.backends import TorchDistBackend

    return TorchDistBackend(topology=args.topology, compress=args.compress, round_timeout=args.round_timeout,
                            heartbeat_timeout=args.heartbeat_timeout, init_from=args.init_from,
                            timeout=args.timeout)


def _describe(args: argparse.Namespace) -> str:
    if args.backend == "deepspeed":
        return (f"DeepSpeed (x{args.data_parallel} data parallel per subnet, ZeRO stage {args.zero_stage}, "
                f"{args.grad_accum} accumulation steps, {args.precision})")
    return f"torch.distributed ({args.topology}, compress {args.compress})"


# -- the ranks ------------------------------------------------------------------------------------
def _rank(args: argparse.Namespace, argv: Sequence[str]) -> int:
    status = RankStatus.from_env()  # set when our launcher started this rank: it reports for us
    _guard(args, argv)
    try:
        return _train_rank(args, status)
    except ISTError as exc:
        if status is None:
            raise
        status.error(str(exc))
        return EXIT_ERROR
    except Exception as exc:
        from istfx.backends.torch_base import is_comm_error

        if status is None or not is_comm_error(exc):
            raise
        # A peer is gone (killed, or stopped by the launcher): the launcher says which and how to resume.
        print(f"istfx: rank {os.environ.get('RANK')} stopped: it lost the connection to another rank",
              file=sys.stderr, flush=True)
        return 1


def _guard(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Exit promptly when the launcher dies or stops us; rank 0 then says how to resume."""
    from istfx.runtime.launch import guard_rank

    def on_stop(reason: str, orphaned: bool) -> None:
        if os.environ.get("RANK") == "0" and orphaned:
            print(f"istfx: {reason}; rank 0 stops the job. {resume_hint(args, _user_argv(argv))}",
                  file=sys.stderr, flush=True)

    guard_rank(on_stop)


def _user_argv(argv: Sequence[str]) -> list[str]:
    """The rank's arguments without the ``--init-from`` its launcher added (a file it has removed)."""
    argv = list(argv)
    status_dir = os.environ.get("ISTFX_STATUS_DIR")
    if status_dir and len(argv) >= 2 and argv[-2] == "--init-from" and argv[-1].startswith(status_dir):
        return argv[:-2]
    return argv


def _train_rank(args: argparse.Namespace, status: RankStatus | None) -> int:
    def enter(phase: str) -> None:
        if status is not None:
            status.set(phase)

    enter("importing")
    import torch

    import istfx

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, world)))
    backend = _make_backend(args)
    enter("capturing")
    ist, loaded = _compile(args, meta=args.init_from is not None)
    enter("loading data")
    torch.manual_seed(args.seed + 1 + rank)
    train, test = _datasets(args, loaded)  # every rank takes part in evaluation (gathering); rank 0 scores
    enter("joining")
    show, totals = _printer(args, args.quiet)
    if rank == 0 and not args.quiet and status is None:  # our launcher said it already
        print(f"istfx train {args.model}: {args.subnets} subnets on {world} ranks, {_describe(args)}", flush=True)
    sharded_save = bool(args.save) and getattr(backend, "topology", None) == "sharded"
    if sharded_save:
        backend.gather_on_finish = False  # the model stays sharded: every rank writes its rows (_save_sharded)
    try:
        history = istfx.fit(ist, _shards(args, train, loaded), backend=backend, callback=show,
                            **_fit_kwargs(args, loaded, test))
        if rank == 0 and not args.quiet:
            _summary(history, totals, ist)
        if sharded_save:
            _save_sharded(args, backend)
        elif rank == 0:
            _save(args, ist)
    except ISTError as exc:
        if status is not None:  # said before leaving the process group, which can block when a peer is gone
            status.error(str(exc))
        raise
    finally:
        backend.close()
    return 0


# -- one process ------------------------------------------------------------------------------------
def _train_local(args: argparse.Namespace) -> int:
    phases = Phases(not args.quiet)
    phases.say(f"istfx train {args.model}: {args.subnets} subnets, local backend (one process)")
    with phases.phase("loading model"):
        import torch

        import istfx
        from istfx.backends import LocalBackend

        torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
        torch.manual_seed(args.seed)
        loaded = load_model_file(args.model)
    with phases.phase("capturing model"):
        ist = _compile_loaded(args, loaded)
    torch.manual_seed(args.seed + 1)
    with phases.phase("loading data"):
        train, test = _datasets(args, loaded)
    show, totals = _printer(args, args.quiet)
    history = istfx.fit(ist, _shards(args, train, loaded), backend=LocalBackend(), callback=show,
                        **_fit_kwargs(args, loaded, test))
    if not args.quiet:
        _summary(history, totals, ist)
    _save(args, ist)
    return 0


# -- model, data, fit -----------------------------------------------------------------------------
def _compile(args: argparse.Namespace, meta: bool):
    import torch

    torch.manual_seed(args.seed)
    loaded = load_model_file(args.model, meta=meta)
    return _compile_loaded(args, loaded), loaded


def _compile_loaded(args: argparse.Namespace, loaded: ModelFile):
    import contextlib

    import istfx

    with contextlib.redirect_stdout(sys.stderr):
        return istfx.compile(loaded.model, example_inputs=loaded.example_inputs, **options.compile_kwargs(args))


def _datasets(args: argparse.Namespace, loaded: ModelFile):
    """(train dataset, eval dataset or None); (None, None) when the file makes its own batches."""
    from istfx.runtime.data import as_dataset, digits

    if args.data == "auto" and loaded.function("train_batches"):
        return None, None
    train_data = loaded.function("train_data")
    if args.data == "digits" or train_data is None:
        return digits(seed=args.seed)
    eval_data = loaded.function("eval_data")
    return (as_dataset(train_data(), "train_data()"),
            as_dataset(eval_data(), "eval_data()") if eval_data else None)


def _shards(args: argparse.Namespace, train, loaded: ModelFile):
    from istfx.runtime.data import ShardBatches

    if train is None:  # the file's train_batches(subnet, subnets, seed) gives each slot its batches
        train_batches = loaded.function("train_batches")
        return lambda subnet: train_batches(subnet, args.subnets, args.seed)
    return lambda subnet: ShardBatches(train, subnet, args.subnets, args.batch_size, seed=args.seed,
                                       shard=not args.no_shard)


def _fit_kwargs(args: argparse.Namespace, loaded: ModelFile, test) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from istfx.runtime.optimizers import from_args

    recipe = from_args(args)
    eval_batches = loaded.function("eval_batches")
    return dict(
        rounds=args.rounds,
        local_steps=args.local_steps,
        **recipe.fit_kwargs(total_steps=args.rounds * args.local_steps),
        loss_fn=loaded.value("loss_fn") or torch.nn.functional.cross_entropy,
        eval_data=(eval_batches() if eval_batches
                   else DataLoader(test, batch_size=512, shuffle=False) if test is not None else None),
        eval_every=args.eval_every,
        metrics_path=args.metrics,
        progress=False,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0,
        resume=bool(args.resume or args.resume_if_present),
        resume_if_present=bool(args.resume_if_present),
        keep_checkpoints=args.keep_checkpoints,
    )


def _save(args: argparse.Namespace, ist) -> None:
    if args.save:
        from istfx.runtime import checkpoint

        checkpoint.atomic_save(checkpoint.model_state(ist), args.save)
        if not args.quiet:
            print(f"istfx: wrote the trained model to {args.save}", flush=True)


def _save_sharded(args: argparse.Namespace, backend) -> None:
    """``--save`` of a sharded run: every rank writes its rows as a DCP checkpoint, nobody gathers.

    ``--save DIR`` keeps that checkpoint (``istfx export DIR --out FILE`` makes
    one file of it); ``--save FILE.safetensors`` writes it next to FILE, then
    rank 0 streams it into FILE a block of rows at a time and removes it.
    """
    import shutil

    from istfx.runtime.export import export

    target = Path(args.save)
    single = target.suffix == ".safetensors"
    folder = target.with_name(target.name + ".shards") if single else target
    if single and os.environ.get("RANK", "0") == "0":
        shutil.rmtree(folder, ignore_errors=True)  # a previous interrupted save
    backend.save_model(folder)
    if os.environ.get("RANK", "0") != "0":
        return
    if single:
        export(folder, target)
        shutil.rmtree(folder, ignore_errors=True)
    if not args.quiet:
        what = "the trained model" if single else "the trained model as a sharded checkpoint (one file per rank; " \
            f"`istfx export {target} --out model.safetensors` writes one file)"
        print(f"istfx: wrote {what} to {target}", flush=True)


# -- printing -----------------------------------------------------------------------------------
def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.3f}"


def _printer(args: argparse.Namespace, quiet: bool):
    """A per-round printer for ``fit``'s callback, and the run's byte totals it keeps (``comm.ByteTotals``)."""
    from istfx.runtime import comm

    totals = comm.ByteTotals()
    shown: dict = {}

    def show(row: dict) -> None:
        sent, received = totals.add(row)
        # the local backend sends nothing: the row then shows what one ps worker would move
        label = "busiest rank MB" if totals.measured else "a ps worker would move MB"
        if quiet:
            return
        acc = row.get("train_accuracy")
        eval_acc = row.get("eval_accuracy")
        line = (f"round {row['round'] + 1:4d}/{args.rounds}  loss {row['train_loss']:.4f}"
                f"  acc {'-' if acc is None else format(acc, '.3f')}"
                f"  test acc {'-' if eval_acc is None else format(eval_acc, '.3f')}"
                f"  | {label} sent {_mb(sent)} recv {_mb(received)}")
        if row.get("ddp_bytes_per_rank") is not None:
            line += f"  (DDP {_mb(row['ddp_bytes_per_rank'])}, local SGD {_mb(row['local_sgd_bytes_per_rank'])})"
        line += f"  {row['seconds']:.2f}s"
        for slot, reason in (row.get("failed") or {}).items():
            line += f"\n    rank {slot} left out: {reason}"
        for slot, rank in (row.get("lost") or {}).items():
            line += f"\n    slot {slot}: this round's update lost with rank {rank} (its units keep their values)"
        dealt = row.get("dealt") or {}
        if dealt and dealt != shown.get("dealt"):
            line += "\n    " + ", ".join(f"slot {s} now trained by rank {r}" for s, r in sorted(dealt.items()))
        shown["dealt"] = dealt
        for slot, reason in (row.get("rejected_reasons") or {}).items():
            line += f"\n    subnet {slot} rejected: {reason}"
        print(line, flush=True)

    return show, totals


def _summary(history, totals, ist) -> None:
    if not history:
        print("istfx: nothing to do (the checkpoint is already at the last round)", flush=True)
        return
    last = history[-1]
    plan = ist.plan
    print(f"done: {len(history)} rounds, final test accuracy "
          f"{'-' if last.get('eval_accuracy') is None else format(last['eval_accuracy'], '.4f')}, "
          f"{plan.subnets} subnets of {max(plan.parameters_per_subnet):,} / {plan.parameters_full:,} parameters",
          flush=True)
    if totals.data_parallel:
        print(f"bytes per rank: IST {_mb(totals.ist)} MB (most loaded rank), data parallel "
              f"{_mb(totals.data_parallel)} MB, local SGD {_mb(totals.local_sgd)} MB for the same samples "
              f"({totals.ratio:.1f}x less than data parallel)", flush=True)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        exit_status = main()
    if "RANK" in os.environ:
        # A rank is done once its files are closed and it left the process group: skip the
        # interpreter's slow teardown of the compiled graphs (seconds per rank on a busy machine).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status)
    raise SystemExit(exit_status)
