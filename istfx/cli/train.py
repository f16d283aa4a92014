"""``istfx train``: train a model file with IST, on this machine or on a cluster.

On this machine (the default) the command starts one process per subnet
itself, gloo over 127.0.0.1, nothing to set up::

    istfx train examples/models/mlp_digits.py --subnets 4 --rounds 30 --local-steps 10
    istfx train model.py --subnets 4 --topology sharded --compress int8 --metrics run.jsonl
    istfx train model.py --subnets 4 --backend local          # one process, subnets in turn

On a cluster, run the same module under torchrun on every node; the ranks
read torchrun's environment and do the same thing::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m istfx.cli.train model.py --subnets 4 --topology sharded

Each rank uses its own shard of the training set (rank ``s`` gets every
S-th sample of a seeded permutation, reshuffled every epoch with a seed of
its own), so ``--backend local`` sees exactly the batches the distributed
run sees. Rank 0 prints one line per round: training loss and accuracy
(over the subnets' batches), test accuracy of the full model, and the bytes
each rank sent and received, next to what data parallel (one all-reduce of
the gradients per step) and local SGD (one all-reduce of the model per
round) would send for the same samples.

The model file defines ``model`` or ``build_model()``, optionally
``example_inputs``, and optionally ``train_data()`` / ``eval_data()``
returning datasets of ``(input, label)`` pairs (default: scikit-learn's
digits, ``--data digits``) and ``loss_fn``. A file whose batches are not
rows of a dataset (graph mini-batches, see ``examples/models/gcn_sbm.py``)
defines ``train_batches(subnet, subnets, seed)`` returning the batches of
one subnet slot, and optionally ``eval_batches()``, instead.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import istfx
from istfx.cli.main import CLIError, run_model_file
from istfx.errors import ISTError

__all__ = ["ShardBatches", "add_parser", "build_parser", "main", "run"]

_EPILOG = """\
MODEL.py defines `model` (an nn.Module) or `build_model()`, optionally
`example_inputs`, `train_data()` and `eval_data()` (datasets of (input, label)
pairs; default: scikit-learn's digits) and `loss_fn`; or, for batches that are
not dataset rows (graphs), `train_batches(subnet, subnets, seed)` and
`eval_batches()` returning iterables of (inputs, targets) batches.

on a cluster (the same ranks under torchrun, on every node):
  torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m istfx.cli.train MODEL.py --subnets 4 --topology sharded

examples:
  istfx train examples/models/mlp_digits.py --subnets 4 --rounds 30 --local-steps 10
  istfx train examples/models/mlp_digits.py --subnets 4 --topology sharded --compress int8
  istfx train examples/models/mlp_digits.py --subnets 4 --checkpoint-dir ckpt --checkpoint-every 5
  istfx train examples/models/mlp_digits.py --subnets 4 --checkpoint-dir ckpt --resume

exit status: 0 on success, 2 on a usage or model error, the failing rank's status otherwise."""


# -- data -----------------------------------------------------------------------------------
class ShardBatches:
    """Batches of one subnet's shard of a dataset, reshuffled every epoch.

    The shard of slot `subnet` is every `subnets`-th sample of a permutation
    seeded by `seed` (``shard=False``: the whole dataset). Epoch ``e`` visits
    it in an order seeded by ``(seed, subnet, e)``, so the batches depend
    only on these numbers: any process, any backend, sees the same ones.
    The last partial batch is dropped when the shard holds a full batch
    (batch norm cannot train on one sample).
    """

    def __init__(self, dataset, subnet: int, subnets: int, batch_size: int, seed: int = 0,
                 shard: bool = True) -> None:
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.indices = order[subnet::subnets] if shard else torch.arange(n)
        if len(self.indices) == 0:
            raise ISTError(f"subnet {subnet} gets no training samples: {n} samples for {subnets} shards.")
        self.dataset = dataset
        self.subnet = subnet
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = len(self.indices) >= self.batch_size
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.subnet * 10_007 + self.epoch)
        self.epoch += 1
        order = self.indices[torch.randperm(len(self.indices), generator=generator)]
        for k in range(len(self)):
            yield _batch(self.dataset, order[k * self.batch_size:(k + 1) * self.batch_size])


def _batch(dataset, index: torch.Tensor):
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # TensorDataset: one gather per tensor
        return tuple(t[index] for t in tensors)
    from torch.utils.data import default_collate

    return default_collate([dataset[int(i)] for i in index])


def _as_dataset(value: Any, what: str):
    from torch.utils.data import TensorDataset

    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        return TensorDataset(*value)
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return value
    raise CLIError(f"{what} must return a dataset of (input, label) pairs or a pair of tensors (X, Y), "
                   f"got {type(value).__name__}")


# -- the model file ---------------------------------------------------------------------------
def load_training_file(path: str | Path, meta: bool = False) -> tuple[nn.Module, Any, Any]:
    """Run a model file; return ``(model, example_inputs or None, module)`` (see ``cli.run_model_file``)."""
    return run_model_file(path, meta=meta)


def _datasets(args: argparse.Namespace, module: Any):
    """(train dataset, eval dataset or None); (None, None) when the file makes its own batches."""
    if args.data == "auto" and callable(getattr(module, "train_batches", None)):
        return None, None
    if args.data == "digits" or (args.data == "auto" and not callable(getattr(module, "train_data", None))):
        from istfx.runtime.data import digits

        return digits(seed=args.seed)
    if not callable(getattr(module, "train_data", None)):
        raise CLIError(f"--data {args.data}: {args.model} defines no train_data()")
    train = _as_dataset(module.train_data(), "train_data()")
    test = _as_dataset(module.eval_data(), "eval_data()") if callable(getattr(module, "eval_data", None)) else None
    return train, test


def _to_meta(value: Any) -> Any:
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, value)


def _compile(args: argparse.Namespace, meta: bool):
    torch.manual_seed(args.seed)
    model, example_inputs, module = load_training_file(args.model, meta=meta)
    if meta and example_inputs is not None:
        example_inputs = _to_meta(example_inputs)
    with contextlib.redirect_stdout(sys.stderr):
        ist = istfx.compile(model, args.subnets, example_inputs=example_inputs, policy=args.policy, seed=args.seed)
    return ist, module


def _fit_kwargs(args: argparse.Namespace, module: Any, test) -> dict:
    from torch.utils.data import DataLoader

    lr, momentum = args.lr, args.momentum
    loss_fn = getattr(module, "loss_fn", None) or torch.nn.functional.cross_entropy
    return dict(
        rounds=args.rounds,
        local_steps=args.local_steps,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum),
        loss_fn=loss_fn,
        eval_data=(module.eval_batches() if callable(getattr(module, "eval_batches", None))
                   else DataLoader(test, batch_size=512, shuffle=False) if test is not None else None),
        eval_every=args.eval_every,
        metrics_path=args.metrics,
        progress=False,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0,
        resume=bool(args.resume),
        keep_checkpoints=args.keep_checkpoints,
    )


def _shards(args: argparse.Namespace, train, module: Any = None):
    if train is None:  # the file's train_batches(subnet, subnets, seed) gives each slot its batches
        def own(subnet: int):
            return module.train_batches(subnet, args.subnets, args.seed)

        return own

    def data(subnet: int) -> ShardBatches:
        return ShardBatches(train, subnet, args.subnets, args.batch_size, seed=args.seed, shard=not args.no_shard)

    return data


# -- printing -----------------------------------------------------------------------------------
def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.3f}"


def _printer(args: argparse.Namespace, quiet: bool, parameter_bytes: int):
    from istfx.runtime import comm

    totals = {"sent": 0.0, "ddp": 0.0, "local_sgd": 0.0, "rounds": 0}
    label = "busiest rank MB"

    def show(row: dict) -> None:
        nonlocal label
        sent = [b for b in row.get("bytes_sent", []) if b is not None] if "bytes_sent" in row else None
        received = [b for b in row.get("bytes_received", []) if b is not None] if "bytes_received" in row else None
        if sent is None:  # local backend: nothing is sent; show what one ps worker would move
            sizes = row.get("bytes_per_subnet", [])
            sent = received = list(sizes)
            label = "a ps worker would move MB"
            steps = args.local_steps
            row.setdefault("ddp_bytes_per_rank", comm.data_parallel_bytes(parameter_bytes, args.subnets, steps))
            row.setdefault("local_sgd_bytes_per_rank", comm.local_sgd_bytes(parameter_bytes, args.subnets))
        totals["sent"] += max(sent, default=0)
        totals["ddp"] += row.get("ddp_bytes_per_rank") or 0.0
        totals["local_sgd"] += row.get("local_sgd_bytes_per_rank") or 0.0
        totals["rounds"] += 1
        if quiet:
            return
        acc = row.get("train_accuracy")
        eval_acc = row.get("eval_accuracy")
        line = (f"round {row['round'] + 1:4d}/{args.rounds}  loss {row['train_loss']:.4f}"
                f"  acc {'-' if acc is None else format(acc, '.3f')}"
                f"  test acc {'-' if eval_acc is None else format(eval_acc, '.3f')}"
                f"  | {label} sent {_mb(max(sent, default=0))} recv {_mb(max(received, default=0))}")
        if row.get("ddp_bytes_per_rank") is not None:
            line += f"  (DDP {_mb(row['ddp_bytes_per_rank'])}, local SGD {_mb(row['local_sgd_bytes_per_rank'])})"
        line += f"  {row['seconds']:.2f}s"
        for slot, reason in (row.get("failed") or {}).items():
            line += f"\n    rank {slot} left out: {reason}"
        for slot, reason in (row.get("rejected_reasons") or {}).items():
            line += f"\n    subnet {slot} rejected: {reason}"
        print(line, flush=True)

    return show, totals


def _parameter_bytes(ist) -> int:
    plan = ist.plan
    return sum(math.prod(plan.state_shapes[n]) * ist.state_tensor(n).element_size()
               for n, kind in plan.state_kinds.items() if kind == "parameter")


def _summary(args, history, totals, ist) -> None:
    if not history:
        print("istfx: nothing to do (the checkpoint is already at the last round)", flush=True)
        return
    last = history[-1]
    plan = ist.plan
    print(f"done: {len(history)} rounds, final test accuracy "
          f"{'-' if last.get('eval_accuracy') is None else format(last['eval_accuracy'], '.4f')}, "
          f"{plan.subnets} subnets of {max(plan.parameters_per_subnet):,} / {plan.parameters_full:,} parameters",
          flush=True)
    if totals["ddp"]:
        ratio = totals["ddp"] / totals["sent"] if totals["sent"] else math.inf
        print(f"bytes per rank: IST {_mb(totals['sent'])} MB (most loaded rank), data parallel "
              f"{_mb(totals['ddp'])} MB, local SGD {_mb(totals['local_sgd'])} MB for the same samples "
              f"({ratio:.1f}x less than data parallel)", flush=True)


# -- running -----------------------------------------------------------------------------------------
def _train_local(args: argparse.Namespace) -> int:
    from istfx.backends import LocalBackend

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    ist, module = _compile(args, meta=False)
    torch.manual_seed(args.seed + 1)
    train, test = _datasets(args, module)
    show, totals = _printer(args, args.quiet, _parameter_bytes(ist))
    if not args.quiet:
        print(f"istfx train: {args.model}, {args.subnets} subnets, local backend (one process)", flush=True)
    history = istfx.fit(ist, _shards(args, train, module), backend=LocalBackend(), callback=show,
                        **_fit_kwargs(args, module, test))
    if not args.quiet:
        _summary(args, history, totals, ist)
    _save(args, ist)
    return 0


def _save(args: argparse.Namespace, ist) -> None:
    if args.save:
        from istfx.runtime import checkpoint

        checkpoint.atomic_save(checkpoint.model_state(ist), args.save)
        if not args.quiet:
            print(f"istfx: wrote the trained model to {args.save}", flush=True)


def _make_backend(args: argparse.Namespace):
    if args.backend == "deepspeed":
        from istfx.backends.deepspeed_engine import DeepSpeedBackend

        return DeepSpeedBackend(data_parallel=args.data_parallel, zero_stage=args.zero_stage,
                                gradient_accumulation=args.grad_accum, precision=args.precision,
                                init_from=args.init_from, timeout=args.timeout)
    from istfx.backends.torch_dist import TorchDistBackend

    return TorchDistBackend(
        args.topology, compress=args.compress, round_timeout=args.round_timeout,
        heartbeat_timeout=args.heartbeat_timeout, init_from=args.init_from, timeout=args.timeout,
    )


def _describe(args: argparse.Namespace) -> str:
    if args.backend == "deepspeed":
        return (f"DeepSpeed (x{args.data_parallel} data parallel per subnet, ZeRO stage {args.zero_stage}, "
                f"{args.grad_accum} accumulation steps, {args.precision})")
    return f"torch.distributed ({args.topology}, compress {args.compress or 'none'})"


def _worker(args: argparse.Namespace) -> int:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ["WORLD_SIZE"]))))
    backend = _make_backend(args)
    meta = args.init_from is not None
    ist, module = _compile(args, meta=meta)
    torch.manual_seed(args.seed + 1 + rank)
    train, test = _datasets(args, module)  # every rank takes part in evaluation (gathering); rank 0 scores
    show, totals = _printer(args, args.quiet, _parameter_bytes(ist))
    if rank == 0 and not args.quiet:
        print(f"istfx train: {args.model}, {args.subnets} subnets on {os.environ['WORLD_SIZE']} ranks, "
              f"{_describe(args)}", flush=True)
    try:
        history = istfx.fit(ist, _shards(args, train, module), backend=backend, callback=show,
                            **_fit_kwargs(args, module, test))
        if rank == 0:
            if not args.quiet:
                _summary(args, history, totals, ist)
            _save(args, ist)
    finally:
        backend.close()
    return 0


def _initial_state(args: argparse.Namespace, directory: str) -> str:
    """Build the model once, seeded, and write its state for the ranks to read their rows from."""
    from istfx.runtime import checkpoint

    torch.manual_seed(args.seed)
    model, _, _ = load_training_file(args.model)
    state, seen = {}, set()
    for name, value in model.state_dict(keep_vars=False).items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        state[name] = value.clone() if key in seen else value
        seen.add(key)
    path = os.path.join(directory, "init.safetensors")
    checkpoint.atomic_save(state, path)
    del model, state
    return path


def _worker_argv(args: argparse.Namespace, init_from: str | None) -> list[str]:
    argv = [args.model, "--subnets", str(args.subnets), "--backend", args.backend, "--topology", args.topology,
            "--data-parallel", str(args.data_parallel), "--zero-stage", str(args.zero_stage),
            "--grad-accum", str(args.grad_accum), "--precision", args.precision,
            "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--data", args.data,
            "--lr", repr(args.lr), "--momentum", repr(args.momentum), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--policy", args.policy, "--eval-every", str(args.eval_every),
            "--compress", args.compress or "none", "--round-timeout", repr(args.round_timeout),
            "--heartbeat-timeout", repr(args.heartbeat_timeout or 0), "--keep-checkpoints",
            str(args.keep_checkpoints), "--timeout", repr(args.timeout)]
    for flag, value in (("--checkpoint-dir", args.checkpoint_dir), ("--checkpoint-every", args.checkpoint_every),
                        ("--metrics", args.metrics), ("--threads", args.threads), ("--init-from", init_from),
                        ("--save", args.save)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--resume", args.resume), ("--quiet", args.quiet), ("--no-shard", args.no_shard)):
        if on:
            argv.append(flag)
    return argv


def _launch(args: argparse.Namespace) -> int:
    from istfx.runtime.launch import launch

    ranks = args.subnets * (args.data_parallel if args.backend == "deepspeed" else 1)
    nproc = args.nproc or ranks
    if nproc != ranks:
        raise CLIError(f"--nproc {nproc} != {ranks}: the torch backend runs one subnet per rank" if
                       args.backend == "torch" else
                       f"--nproc {nproc} != --subnets {args.subnets} x --data-parallel {args.data_parallel}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    tolerant = args.backend == "torch" and args.topology == "ps"  # a dead worker leaves the ps job running
    with tempfile.TemporaryDirectory(prefix="istfx-train-") as tmp:
        init_from = args.init_from or _initial_state(args, tmp)
        return launch(_worker_argv(args, init_from), nproc, module="istfx.cli.train", threads=threads,
                      master_port=args.master_port,
                      tolerate=(lambda rank: rank != 0) if tolerant else (lambda rank: False))


def run(args: argparse.Namespace) -> int:
    """Run ``istfx train`` for parsed `args`."""
    if args.subnets < 1:
        raise CLIError(f"--subnets must be >= 1, got {args.subnets}")
    for flag in ("rounds", "local_steps", "batch_size", "eval_every"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.resume and not args.checkpoint_dir:
        raise CLIError("--resume needs --checkpoint-dir")
    if args.compress == "none":
        args.compress = None
    if args.backend != "deepspeed" and (args.data_parallel != 1 or args.grad_accum != 1
                                        or args.zero_stage != 1 or args.precision != "fp32"):
        raise CLIError("--data-parallel, --grad-accum, --zero-stage and --precision belong to --backend deepspeed")
    if args.backend == "deepspeed" and (args.topology != "ps" or args.compress):
        raise CLIError("--backend deepspeed exchanges full-precision subnets through rank 0: "
                       "--topology sharded and --compress are options of --backend torch")
    if args.topology == "sharded" and args.backend == "torch":
        from istfx.core.plan import parse_policy

        try:
            disjoint = parse_policy(args.policy).disjoint
        except ValueError as exc:
            raise CLIError(f"--policy {args.policy!r}: {exc}") from None
        if not disjoint:
            raise CLIError(f"--topology sharded needs a disjoint policy ('disjoint' or 'rolling'), got "
                           f"{args.policy!r}; use --topology ps")
    if args.metrics and os.environ.get("RANK", "0") == "0" and not args.resume:
        Path(args.metrics).unlink(missing_ok=True)  # a fresh run starts a fresh metrics file
    if args.backend == "local":
        return _train_local(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _worker(args)
    return _launch(args)


# -- argument parsing ---------------------------------------------------------------------------
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.py", help="Python file defining `model` or `build_model()`")
    p.add_argument("-s", "--subnets", type=int, default=4, metavar="S", help="subnets per round (default: 4)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to start on this machine (default and only value: --subnets)")
    p.add_argument("--backend", choices=("torch", "deepspeed", "local"), default="torch",
                   help="torch: one process per subnet over torch.distributed (default); deepspeed: each subnet "
                        "trained by a DeepSpeed engine on --data-parallel ranks; local: one process")
    p.add_argument("--topology", choices=("ps", "sharded"), default="ps",
                   help="ps: rank 0 holds the model (default); sharded: no rank holds the full model")
    p.add_argument("--data-parallel", type=int, default=1, metavar="D",
                   help="deepspeed: ranks per subnet; the world is subnets x D (default: 1)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=1, help="deepspeed: ZeRO stage (default: 1)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="G",
                   help="deepspeed: micro-batches per rank per optimizer step (default: 1)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="deepspeed: engine precision (default: fp32; fp16 needs a GPU)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--rounds", type=int, default=30, help="IST rounds (default: 30)")
    p.add_argument("--local-steps", type=int, default=10, help="SGD steps per subnet per round (default: 10)")
    p.add_argument("--data", default="auto",
                   help="'digits' (scikit-learn digits) or 'auto' (the file's train_data() if it has one, "
                        "else digits; default)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, reset every round (default: 0.9)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of each subnet (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data shards and the rounds")
    p.add_argument("--policy", default="disjoint", help="'disjoint' (default), 'rolling' or 'overlap(KEEP)' (ps)")
    p.add_argument("--no-shard", action="store_true", help="every subnet draws from the whole training set")
    p.add_argument("--eval-every", type=int, default=1, help="rounds between test evaluations (default: 1)")
    p.add_argument("--compress", choices=("none", "int8", "int4"), default="none",
                   help="quantize the exchanged slices (per-row scales)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go")
    p.add_argument("--checkpoint-every", type=int, default=5, help="rounds between checkpoints (default: 5)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept (default: 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--metrics", default=None, metavar="OUT.jsonl", help="per-round metrics as JSON lines (rank 0)")
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="ps: seconds to wait for a round's results before going on without a rank (default: 300)")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0,
                   help="ps: a rank silent this long is taken as dead (0: off; default: 60)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / nproc)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port on 127.0.0.1 (default: a free one)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a collective or a receive may wait before the job fails (default: 1800)")
    p.add_argument("--init-from", default=None, metavar="STATE.safetensors",
                   help="initial model state (e.g. a --save of another run); ranks build the model on the "
                        "meta device and read only their rows. `istfx train` writes one itself")
    p.add_argument("--save", default=None, metavar="OUT.safetensors", help="write the trained model here (rank 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-round lines")


def add_parser(subparsers) -> None:
    """Register ``train`` on the ``istfx`` command line."""
    p = subparsers.add_parser(
        "train",
        help="train a model file with IST (this machine: one process per subnet; or under torchrun)",
        description="Train the model defined in MODEL.py with Independent Subnet Training. By default\n"
                    "one process per subnet starts on this machine (torch.distributed, gloo on\n"
                    "127.0.0.1); under torchrun the same command runs as the ranks of a cluster job.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m istfx.cli.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CLIError, ISTError) as exc:
        print(f"istfx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        status = main()
    if "RANK" in os.environ:
        # A rank is done once its files are closed and it left the process group: skip the
        # interpreter's slow teardown of the compiled graphs (seconds per rank on a busy machine).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
