"""One rank of a time-to-accuracy run: the same task trained by DDP, local SGD or IST, on a clock.

Started by ``benchmarks/time_to_accuracy.py`` (one process per rank, each in
its own network namespace, torchrun's environment variables set)::

    python benchmarks/tta_worker.py --method ddp|localsgd|ist-ps|ist-sharded --model mlp|gpt \\
        --budget 120 --local-steps 20 --out-dir DIR

Methods (every rank the same task, batches of its own, SGD/AdamW as the task says):

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; one gradient
  all-reduce per step.
- ``localsgd``: PyTorch's post-local SGD: a DDP model with
  ``post_localSGD_hook`` (``PostLocalSGDState``, no gradient all-reduce
  after ``--warmup-steps`` DDP steps) and ``PostLocalSGDOptimizer`` with a
  ``PeriodicModelAverager`` that averages the model every ``--local-steps``
  steps.
- ``ist-ps`` / ``ist-sharded``: ``istfx.compile`` + ``TorchDistBackend``
  (parameter server or sharded topology), one subnet per rank, a fresh
  optimizer per subnet per round, ``--local-steps`` steps per round.

Training runs in chunks of ``--local-steps`` steps (a round, an averaging
period; DDP: a quarter of that). After each chunk the ranks meet (a
barrier) and rank 0 decides whether to evaluate (every ``budget / points``
seconds of training, and after 1/16, 1/8, 1/4 and 1/2 of that at the start)
and whether the budget is spent. Evaluation windows are left out of the clock
and of the byte counts: rank 0 scores the full model (IST sharded gathers
it first), every rank reads the byte counters of its network interface
(``/proc/net/dev`` of its namespace) before and after, and the traffic in
between is subtracted. The barrier that ends each chunk makes sure that
every byte of the chunk was delivered (and counted) before a window opens.

Each rank writes ``DIR/rank<R>.json``: its clock, CPU time and byte counts
at every evaluation point; rank 0 adds the scores.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tta_tasks  # noqa: E402

IST_VARIANTS = {  # method -> (topology, optimizer state, outer step, compression of what moves)
    "ist-ps": ("ps", "reset", False, None), "ist-ps-carry": ("ps", "carry", False, None),
    "ist-ps-outer": ("ps", "carry", True, None),
    "ist-sharded": ("sharded", "reset", False, None), "ist-sharded-carry": ("sharded", "carry", False, None),
    "ist-sharded-outer": ("sharded", "carry", True, None),
    "ist-sharded-outer-int8": ("sharded", "carry", True, "int8"),
}
METHODS = ("ddp", "localsgd", "diloco", *IST_VARIANTS)


def link_counters(iface: str | None) -> tuple[int, int] | None:
    """(received, sent) bytes of `iface` in this process's network namespace, or None without one."""
    if not iface:
        return None
    with open("/proc/self/net/dev", encoding="ascii") as handle:
        for line in handle:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == iface:
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise RuntimeError(f"interface {iface!r} not found in /proc/self/net/dev")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB, or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- methods -------------------------------------------------------------------------------------
class _Steps:
    """Plain optimizer steps on this rank's batches (the DDP and local SGD loops)."""

    def __init__(self, task: tta_tasks.Task, rank: int, world: int) -> None:
        self.task, self.batches = task, task.batches(rank, world)
        self.steps = 0

    def run(self, model: torch.nn.Module, optimizer, steps: int) -> None:
        for _ in range(steps):
            x, y = next(self.batches)
            loss = self.task.loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.steps += 1


class DDP:
    """Data parallel: ``DistributedDataParallel``, one gradient all-reduce per step."""

    def __init__(self, task: tta_tasks.Task, args: argparse.Namespace, rank: int, world: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.model = DistributedDataParallel(task.model)
        self.optimizer = task.optimizer(list(self.model.parameters()))
        self.loop = _Steps(task, rank, world)
        self.world = world
        self.parameter_bytes = _parameter_bytes(task.model)
        self.app_sent = 0.0

    def chunk(self, steps: int) -> None:
        from istfx.runtime import comm

        self.loop.run(self.model, self.optimizer, steps)
        self.app_sent += comm.data_parallel_bytes(self.parameter_bytes, self.world, steps)

    def scored_model(self):
        return contextlib.nullcontext(self.model.module)

    def describe(self) -> dict:
        return {"parameter_bytes": self.parameter_bytes, "bytes_by": "ring all-reduce of the gradients per step"}


class LocalSGD:
    """PyTorch's post-local SGD: local steps, the model averaged every `period` steps."""

    def __init__(self, task: tta_tasks.Task, args: argparse.Namespace, rank: int, world: int) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer
        from torch.nn.parallel import DistributedDataParallel

        warmup, period = args.warmup_steps, args.local_steps
        if warmup % period:
            raise SystemExit(f"--warmup-steps {warmup} must be a multiple of --local-steps {period}")
        self.model = DistributedDataParallel(task.model)
        # After `warmup` DDP steps no gradient is all-reduced (each worker is its own node here).
        state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=warmup,
                                  post_local_gradient_allreduce=False)
        self.model.register_comm_hook(state, post_localSGD_hook)
        # The averager counts calls from 0: averaging at calls warmup + period - 1 + k * period
        # puts it after the last step of every chunk, so the scored model is the averaged one.
        averager = PeriodicModelAverager(period=period, warmup_steps=warmup + period - 1)
        self.optimizer = PostLocalSGDOptimizer(optim=task.optimizer(list(self.model.parameters())),
                                               averager=averager)
        self.loop = _Steps(task, rank, world)
        self.world, self.warmup, self.period = world, warmup, period
        self.parameter_bytes = _parameter_bytes(task.model)
        self.app_sent = 0.0

    def chunk(self, steps: int) -> None:
        from istfx.runtime import comm

        before = self.loop.steps
        self.loop.run(self.model, self.optimizer, steps)
        ddp_steps = max(0, min(self.loop.steps, self.warmup) - before)
        self.app_sent += comm.data_parallel_bytes(self.parameter_bytes, self.world, ddp_steps)
        self.app_sent += comm.local_sgd_bytes(self.parameter_bytes, self.world, 1)

    def scored_model(self):
        return contextlib.nullcontext(self.model.module)

    def describe(self) -> dict:
        return {"parameter_bytes": self.parameter_bytes, "period": self.period, "warmup_steps": self.warmup,
                "bytes_by": "ring all-reduce of the model per period (+ gradients during warmup)"}


class IST:
    """istfx IST on the torch backend: one subnet per rank, `steps` local steps per round.

    ``state``: ``"reset"`` (a fresh optimizer per subnet per round) or
    ``"carry"`` (momentum / Adam moments travel with their units); ``outer``:
    DiLoCo's Nesterov step on each round's change (``--outer-lr``,
    ``--outer-momentum``), else the plain write-back.
    """

    def __init__(self, task: tta_tasks.Task, args: argparse.Namespace, rank: int, world: int,
                 topology: str, state: str = "reset", outer: bool = False, compress: str | None = None) -> None:
        import istfx
        from istfx.backends import SubnetResult
        from istfx.backends import TorchDistBackend
        from istfx.runtime import optim_state
        from istfx.runtime.state_travel import StateConfig

        self.ist = istfx.compile(task.model, subnets=world, example_inputs=task.example_inputs, seed=args.seed)
        self.backend = TorchDistBackend(topology, timeout=args.timeout, compress=compress)
        self.backend.configure_state(StateConfig(state, args.outer_lr if outer else 1.0,
                                                 args.outer_momentum if outer else 0.0))
        self.backend.prepare(self.ist, 0)
        self.round, self.rank = 0, rank
        self.app_sent = 0.0
        self.state, self.outer = state, outer
        batches = task.batches(rank, world)

        def train(index: int, subnet: torch.nn.Module) -> SubnetResult:
            named = {n: p for n, p in subnet.named_parameters() if p.requires_grad}
            optimizer = task.optimizer(list(named.values()))
            carried = optim_state.attached(subnet)
            if carried:
                optim_state.load_into(optimizer, named, carried)
            loss_sum, samples = 0.0, 0
            for _ in range(self.steps):
                x, y = next(batches)
                loss = task.loss_fn(subnet(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * task.samples_per_batch
                samples += task.samples_per_batch
            return SubnetResult(samples=samples, loss_sum=loss_sum, correct=None, steps=self.steps,
                                optimizer_state=optim_state.extract(optimizer, named) if state == "carry" else None)

        self.train = train
        self.steps = args.local_steps
        self.plan = self.ist.plan

    def chunk(self, steps: int) -> None:
        self.steps = steps
        result = self.backend.run_round(self.ist, self.round, self.train)
        sent = result.extra.get("bytes_sent")
        if isinstance(sent, list):
            sent = sent[self.rank]
        self.app_sent += float(sent or 0)
        self.round += 1

    def scored_model(self):
        return self.backend.full_model(self.ist)

    def describe(self) -> dict:
        return {"topology": self.backend.topology, "parameters_full": self.plan.parameters_full,
                "parameters_per_subnet": list(self.plan.parameters_per_subnet), "optimizer_state": self.state,
                "outer": self.outer, "compress": self.backend.compress, "bytes_by": "the backend's own count of the slices (and state) it sent"}

    def close(self) -> None:
        self.backend.close()


class DiLoCo:
    """torchft's DiLoCo, used as its users do: a Manager per replica, a lighthouse, ``DiLoCo(...)``.

    Every worker is a replica group of one rank: it hosts its group's
    ``TCPStore`` on its own address, its ``Manager`` joins the quorum through
    the ``torchft_lighthouse`` that the driver runs in rank 0's namespace,
    and every ``--local-steps`` inner steps ``torchft.local_sgd.DiLoCo``
    all-reduces the pseudo-gradients (torchft's gloo process group over the
    same links) and takes the outer Nesterov step.
    """

    def __init__(self, task: tta_tasks.Task, args: argparse.Namespace, rank: int, world: int) -> None:
        from torch.distributed import TCPStore
        from torchft import Manager, ProcessGroupGloo
        from torchft.local_sgd import DiLoCo as TorchftDiLoCo

        host = os.environ["ISTFX_TTA_ADDR"]
        lighthouse = os.environ["TORCHFT_LIGHTHOUSE"]
        base = int(os.environ["ISTFX_TTA_FT_PORT"])
        self.model = task.model
        self.inner = task.optimizer(list(self.model.parameters()))
        self.outer = torch.optim.SGD(self.model.parameters(), lr=args.outer_lr, momentum=args.outer_momentum,
                                     nesterov=True)
        timeout = datetime.timedelta(seconds=args.timeout)
        # The replica group's store (one rank per group: this process hosts it).
        self.store = TCPStore(host, base + 1 + rank, is_master=True, wait_for_workers=False)

        def state_dict() -> dict:
            return {"model": self.model.state_dict(), "inner_optim": self.inner.state_dict()}

        def load_state_dict(state: dict) -> None:
            self.model.load_state_dict(state["model"])
            self.inner.load_state_dict(state["inner_optim"])

        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout), min_replica_size=world, use_async_quorum=False,
            load_state_dict=load_state_dict, state_dict=state_dict, replica_id=f"tta{rank}",
            store_addr=host, store_port=base + 1 + rank, rank=0, world_size=1, lighthouse_addr=lighthouse,
            hostname=host, port=base + 100 + rank, timeout=timeout, quorum_timeout=timeout,
            connect_timeout=timeout,
            init_sync=False,  # every replica starts from the same seeded weights
        )
        self.diloco = TorchftDiLoCo(self.manager, [self.model], self.inner, self.outer,
                                    sync_every=args.local_steps, backup_device=torch.device("cpu"),
                                    pin_memory=False)
        self.diloco.__enter__()
        self.loop = _Steps(task, rank, world)
        self.world, self.period = world, args.local_steps
        self.parameter_bytes = _parameter_bytes(task.model)
        self.app_sent = 0.0

    def chunk(self, steps: int) -> None:
        from istfx.runtime import comm

        self.loop.run(self.model, self.inner, steps)  # the inner optimizer's hook syncs every period
        self.app_sent += comm.local_sgd_bytes(self.parameter_bytes, self.world, steps // self.period)

    def scored_model(self):
        return contextlib.nullcontext(self.model)

    def describe(self) -> dict:
        return {"parameter_bytes": self.parameter_bytes, "period": self.period,
                "outer": f"SGD lr {self.outer.defaults['lr']} momentum {self.outer.defaults['momentum']} nesterov",
                "bytes_by": "ring all-reduce of the pseudo-gradients per period"}

    def close(self) -> None:
        self.diloco.__exit__(None, None, None)
        self.manager.shutdown(wait=False)
        if dist.is_initialized():
            dist.destroy_process_group()


def make_method(name: str, task: tta_tasks.Task, args: argparse.Namespace, rank: int, world: int):
    """The method object for `name` (one of :data:`METHODS`)."""
    if name == "ddp":
        return DDP(task, args, rank, world)
    if name == "localsgd":
        return LocalSGD(task, args, rank, world)
    if name == "diloco":
        return DiLoCo(task, args, rank, world)
    if name in IST_VARIANTS:
        topology, state, outer, compress = IST_VARIANTS[name]
        return IST(task, args, rank, world, topology, state, outer, compress)
    raise SystemExit(f"unknown method {name!r}: use one of {', '.join(METHODS)}")


# -- the clock -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Train until rank 0's training clock passes ``args.budget``; return this rank's record."""
    torch.set_num_threads(1)
    wall_start = time.perf_counter()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    task = tta_tasks.build(args)
    rss_base = _status_mb("VmRSS")  # interpreter, torch, data and the model as built: the same for every method
    method = make_method(args.method, task, args, rank, world)
    dist.barrier()
    setup_seconds = time.perf_counter() - wall_start
    base = link_counters(iface)
    excluded = [0, 0]
    train_seconds = cpu_seconds = eval_seconds = 0.0
    steps = 0
    every = args.budget / args.points
    next_eval = 0.0
    # DDP synchronises every step anyway: shorter chunks give its curve the resolution of the others'.
    chunk = max(1, args.local_steps // 4) if args.method == "ddp" else args.local_steps
    points: list[dict] = []
    flag = torch.zeros(1, dtype=torch.int64)
    while True:
        if points:  # the first window scores the untrained model
            t, c = time.perf_counter(), time.process_time()
            method.chunk(chunk)
            dist.barrier()  # every byte of the chunk is delivered before a window can open
            train_seconds += time.perf_counter() - t
            cpu_seconds += time.process_time() - c
            steps += chunk
        if rank == 0:
            spent = train_seconds >= args.budget or steps >= args.max_steps
            flag[0] = 2 if spent else (1 if train_seconds + 1e-9 >= next_eval else 0)
        dist.broadcast(flag, 0)
        if flag[0] == 0:
            continue
        t = time.perf_counter()
        before = link_counters(iface)
        score = None
        with method.scored_model() as model:
            if rank == 0:
                score = task.evaluate(model)
        dist.barrier()  # the gather (IST sharded) is delivered before the window closes
        after = link_counters(iface)
        eval_seconds += time.perf_counter() - t
        counted = None if before is None else [b - b0 - e for b, b0, e in zip(before, base, excluded)]
        if before is not None:
            excluded = [e + a - b for e, a, b in zip(excluded, after, before)]
        points.append({
            "train_seconds": train_seconds, "cpu_seconds": cpu_seconds, "steps": steps,
            "samples": steps * world * task.samples_per_batch,
            "link_rx": None if counted is None else counted[0], "link_tx": None if counted is None else counted[1],
            "app_sent": method.app_sent, **(score or {}),
        })
        # Evaluations every `every` seconds, denser at the start where the curves rise fastest:
        # after every/16, every/8, every/4, every/2 seconds of training.
        next_eval = train_seconds + min(every, max(every / 16, train_seconds))
        if flag[0] == 2:
            break
    record = {
        "rank": rank, "world": world, "method": args.method, "iface": iface, "points": points,
        "setup_seconds": setup_seconds, "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - wall_start, "method_info": method.describe(),
        "rss_base_mb": rss_base, "rss_peak_mb": _status_mb("VmHWM"),
        "task_info": task.info if rank == 0 else None,
    }
    if hasattr(method, "close"):
        method.close()
    elif dist.is_initialized():
        dist.destroy_process_group()
    return record


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The task and method flags shared by the worker and the driver."""
    parser.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="steps per IST round and per local SGD averaging period (default: mlp 20, gpt 10)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="local SGD: DDP steps before local SGD starts (a multiple of --local-steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="per worker (default: mlp 128, gpt 16)")
    parser.add_argument("--lr", type=float, default=None, help="default: mlp SGD 0.1, gpt AdamW 3e-3")
    parser.add_argument("--momentum", type=float, default=0.9, help="mlp: SGD momentum")
    parser.add_argument("--hidden", type=int, default=4096, help="mlp: hidden units")
    parser.add_argument("--copies", type=int, default=40, help="mlp: augmented copies of each training digit")
    parser.add_argument("--block-size", type=int, default=64, help="gpt: context")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo (and IST's outer step): outer lr")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo / IST outer Nesterov momentum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds (rank 0's clock)")
    parser.add_argument("--points", type=int, default=30, help="evaluations spread over the budget")
    parser.add_argument("--max-steps", type=int, default=10 ** 9, help="stop after this many steps per worker")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Per-model defaults for the flags left unset."""
    defaults = {"mlp": {"local_steps": 20, "batch_size": 128, "lr": 0.1},
                "gpt": {"local_steps": 10, "batch_size": 16, "lr": 3e-3}}[args.model]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    add_task_arguments(parser)
    args = fill_defaults(parser.parse_args())
    import warnings

    warnings.filterwarnings("ignore")
    record = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"rank{record['rank']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    sys.stdout.flush()
    os._exit(0)  # skip the slow interpreter teardown of compiled graphs


if __name__ == "__main__":
    main()
