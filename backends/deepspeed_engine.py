"""The DeepSpeed backend: each subnet trained by a DeepSpeed engine on its own group of ranks.

World = S subnet groups x D data-parallel ranks. Rank ``r`` trains subnet
slot ``r // D`` as data-parallel rank ``r % D`` of its group. Every round:

1. rank 0, which holds the full model (the original IST protocol), cuts it
   and sends each group's leader (data-parallel rank 0) its subnet as one
   flat buffer; the leader broadcasts it to its group (``deepspeed.comm``);
2. every rank wraps the subnet in a fresh ``deepspeed.initialize`` engine:
   the optimizer the user gave (``fit(optimizer=...)``) under ZeRO stage 0,
   1 or 2 over the group, gradient accumulation, bf16/fp16 where the hardware
   has it, any further DeepSpeed config keys the user passes;
3. the engine takes the round's ``local_steps`` optimizer steps; each step
   consumes ``D x G`` batches of the slot's stream (G = accumulation steps),
   rank ``d`` of the group computing every D-th one, so the group's step
   averages the same gradients one rank accumulating ``D x G`` batches would;
4. the leaders send the trained slices (full-precision values, gathered
   from ZeRO's partitions) back; rank 0 reassembles, weighted by samples,
   rejecting non-finite updates.

The engine is rebuilt each round because each round's subnet holds other
units. Optimizer state starts fresh every round (as in IST) unless
``fit(optimizer_state="carry")``: then, under ZeRO 0, rank 0 keeps the full
state and sends each group its slice after the payload, and the leaders send
the trained state back after the update; the outer step runs on rank 0. Launch under
the ``deepspeed`` launcher, torchrun, or ``istfx train --backend deepspeed``::

    deepspeed --num_gpus 4 --module istfx.cli.train model.py --backend deepspeed \\
        --subnets 2 --data-parallel 2 --zero-stage 2

On CPU (DeepSpeed's CPU accelerator) the ranks talk gloo; on GPUs NCCL.
A dead rank stops the job (the engines' collectives cannot lose a member);
use the torch backend's ``ps`` topology where workers may fail.

Each round's ``RoundResult.extra`` reports per rank the bytes of the subnet
exchange (measured buffer sizes) plus the group's gradient traffic (one ring
all-reduce of the subnet's parameters per optimizer step, what ZeRO's
reduce-scatter and all-gather move), next to data parallel and local SGD over
all ``S x D`` ranks for the same samples.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from istfx.core.compiler import ISTModel, ReassembleReport
from istfx.errors import ISTError
from istfx.runtime import checkpoint as ckpt
from istfx.runtime import comm
from istfx.runtime.backend_api import RoundResult, SubnetResult, TrainSubnet, call_model, model_device
from istfx.runtime.optim_state import attach, pack_state, trained_names, unpack_state
from istfx.runtime.state_travel import CentralState, StateConfig

from .memory import peak_rss_mb, rss_mb
from .model_storage import release_model, state_of
from .torch_base import TorchDistBackend, init_distributed

__all__ = ["BUILD_COMMAND", "DeepSpeedBackend", "PRECISIONS", "check_shm_op_build", "shm_op_directory"]

PRECISIONS = ("fp32", "bf16", "fp16")
_HEADER = 7  # float64 fields of a leader's result header: round, samples, loss, correct, steps, rss, peak


def _deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise ISTError(
            "the deepspeed backend needs DeepSpeed. Install it against the torch you have with:\n"
            "    pip install --no-build-isolation 'deepspeed>=0.16'\n"
            "(a plain `pip install deepspeed` may build against a fresh torch download)."
        ) from exc
    return deepspeed


# -- DeepSpeed's CPU shared-memory comm op, JIT-built on first use --------------------------------------
SHM_OP = "deepspeed_shm_comm"
_STALE_AFTER = 15.0  # seconds a lock may sit with no build process before it counts as stale
_SAY_EVERY = 15.0


def shm_op_directory() -> str:
    """Where torch builds DeepSpeed's shm comm op (``$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm``, by default
    ``~/.cache/torch_extensions/pyXY_cpu/deepspeed_shm_comm``)."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(SHM_OP, verbose=False)


def _builders(directory: str) -> list[int]:
    """Processes working in `directory` (ninja and the compilers it runs there)."""
    found = []
    real = os.path.realpath(directory)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.path.realpath(os.readlink(f"/proc/{entry}/cwd")) == real:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def check_shm_op_build(wait: float = 1800.0, say=None) -> None:
    """Make sure a first use of DeepSpeed on CPU will not wait forever on an interrupted build of its op.

    torch's JIT build guards the build folder with a ``lock`` file
    (``FileBaton``) that an interrupted build leaves behind; every later run
    then waits on it without a word. A lock with a build running (a process
    working in the folder, or a lock younger than a few seconds) is waited for
    with a message (at most `wait` seconds); a lock with no build is stale: an
    :class:`ISTError` names it and the command that clears it. Build the op
    ahead with ``scripts/setup.sh`` (or the command in :data:`BUILD_COMMAND`).
    """
    if torch.cuda.is_available():
        return  # GPU runs use NCCL: DeepSpeed builds no shm op
    directory = shm_op_directory()
    lock = os.path.join(directory, "lock")
    if say is None:
        def say(text: str) -> None:
            print(text, file=sys.stderr, flush=True)
    start = last_said = time.monotonic()
    while os.path.exists(lock):
        builders = _builders(directory)
        try:
            age = time.time() - max(os.stat(p).st_mtime for p in (lock, directory) if os.path.exists(p))
        except OSError:
            continue  # the lock just went away
        if not builders and age > _STALE_AFTER:
            raise ISTError(
                f"DeepSpeed's shared-memory comm op has a stale build lock: {lock} (an interrupted build, "
                f"{age:.0f}s old, no build running). Clear it with `rm -rf {directory}` and run again "
                f"(the op is rebuilt on first use, or ahead with: {BUILD_COMMAND})."
            )
        now = time.monotonic()
        if now - start > wait:
            raise ISTError(f"DeepSpeed's shared-memory comm op is still being built in {directory} after "
                           f"{wait:.0f}s (processes {builders}); wait for it or stop them and `rm -rf {directory}`.")
        if now - last_said >= _SAY_EVERY or last_said == start:
            last_said = now
            who = f" by process {', '.join(map(str, builders))}" if builders else ""
            say(f"istfx: waiting for DeepSpeed's shared-memory comm op being built in {directory}{who} "
                f"({now - start:.0f}s)...")
        time.sleep(0.5)


BUILD_COMMAND = ("python -c \"from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
                 "ShareMemCommBuilder().load()\"")


class _GroupTopology:
    """DeepSpeed's "model parallel unit": each subnet is a whole model on its group of ranks.

    The data-parallel group is the subnet's group; the model-parallel group is
    the rank alone, so norms and overflow checks never mix subnets.
    """

    def __init__(self, rank: int, data_parallel: int, group, solo, group_ranks: list[int]) -> None:
        self.rank, self.data_parallel = rank, data_parallel
        self.group, self.solo, self.group_ranks = group, solo, group_ranks

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self):
        return self.solo

    def get_data_parallel_rank(self) -> int:
        return self.rank % self.data_parallel

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.group_ranks)


class _EngineStep:
    """One subnet's training through a DeepSpeed engine (a :class:`~istfx.runtime.backend_api.SubnetStepper`)."""

    def __init__(self, backend: DeepSpeedBackend, subnet: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        deepspeed = _deepspeed()
        self.subnet = subnet
        self.data_parallel = backend.data_parallel
        self.dp_rank = backend.rank % backend.data_parallel
        self.dtypes = {id(t): t.dtype for t in [*subnet.parameters(), *subnet.buffers()]}
        self.engine, *_ = deepspeed.initialize(model=subnet, optimizer=optimizer, config=backend.engine_config(),
                                               mpu=backend.topology_unit)
        self.low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(backend.precision)
        self.before_step = None  # set by a step control (lr schedule, clipping): runs right before each step

    def computes(self, draw: int) -> bool:
        return draw % self.data_parallel == self.dp_rank

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(self._cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: self._cast(v, dtype) for k, v in value.items()}
        return value

    def forward(self, inputs: Any) -> Any:
        if self.low is not None:  # the engine holds low-precision weights; the loss is taken in fp32
            return self._cast(call_model(self.engine, self._cast(inputs, self.low)), torch.float32)
        return call_model(self.engine, inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if self.before_step is not None and self.engine.is_gradient_accumulation_boundary():
            self.before_step()
        self.engine.step()  # steps the optimizer only at the accumulation boundary

    def step(self) -> None:
        pass  # the engine stepped in backward() at the accumulation boundary

    def finish(self) -> None:
        """Write the full-precision trained values back into the subnet's own tensors (a group collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        with torch.no_grad():
            for param in self.subnet.parameters():
                full = safe_get_full_fp32_param(param)  # gathers ZeRO's fp32 partitions over the group
                dtype = self.dtypes.get(id(param), param.dtype)
                param.data = (full if full is not None else param.detach()).to(dtype).reshape(param.shape)
            for buffer in self.subnet.buffers():
                dtype = self.dtypes.get(id(buffer))
                if dtype is not None and buffer.dtype != dtype:
                    buffer.data = buffer.data.to(dtype)
        destroy = getattr(self.engine, "destroy", None)
        if callable(destroy):
            destroy()
        self.engine = None


class DeepSpeedBackend(TorchDistBackend):
    """IST rounds whose subnets train under DeepSpeed engines (see the module docstring).

    Args:
        data_parallel: ranks per subnet (D); the world must be ``subnets x D``.
        zero_stage: ZeRO stage of each engine over its group: 0, 1 or 2.
        gradient_accumulation: micro-batches per rank per optimizer step (G).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp16 needs a GPU;
            bf16 runs on CPUs that DeepSpeed's CPU accelerator supports).
        config: further DeepSpeed config entries, merged over the ones these
            arguments make (e.g. ``{"gradient_clipping": 1.0}``).
        timeout: the process group's timeout in seconds.
        init_from: a safetensors file with the initial model state, read by rank 0.
    """

    name = "deepspeed"
    topology = "ps"  # rank 0 holds the full model

    def __init__(
        self,
        *,
        data_parallel: int = 1,
        zero_stage: int = 1,
        gradient_accumulation: int = 1,
        precision: str = "fp32",
        config: dict | None = None,
        timeout: float = 1800.0,
        init_from: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(timeout=timeout, init_from=init_from)
        for label, value, low in (("data_parallel", data_parallel, 1), ("gradient_accumulation",
                                                                         gradient_accumulation, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ISTError(f"{label} must be an int >= {low}, got {value!r}.")
        if zero_stage not in (0, 1, 2):
            raise ISTError(f"zero_stage must be 0, 1 or 2, got {zero_stage!r} (stage 3 partitions the parameters "
                           "themselves, which IST's slicing already does).")
        precision = str(precision).strip().lower()
        if precision not in PRECISIONS:
            raise ISTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        if precision == "fp16" and not torch.cuda.is_available():
            raise ISTError("precision 'fp16' needs a GPU; on CPU use 'bf16' or 'fp32'.")
        self.data_parallel = data_parallel
        self.zero_stage = zero_stage
        self.gradient_accumulation = gradient_accumulation
        self.precision = precision
        self.extra_config = dict(config or {})
        check_shm_op_build()  # before any rank starts: never a silent wait on an interrupted build

    def configure_state(self, config: StateConfig) -> None:
        """Carry optimizer state / take the outer step. Rank 0 keeps the full state and the outer momentum,
        and ships each group its state slice with its parameters; ZeRO 0 only (stages 1 and 2 keep the
        state in the engine's own partitions)."""
        if config.carry and self.zero_stage != 0:
            raise ISTError(f"optimizer_state='carry' with DeepSpeed needs ZeRO stage 0 (got {self.zero_stage}): "
                           "stages 1 and 2 keep the optimizer state in the engine's partitions. Use "
                           "--zero-stage 0, or optimizer_state='reset'.")
        self.state_config = config
        self._central = None

    def __repr__(self) -> str:
        return (f"DeepSpeedBackend(rank={self.rank}/{self.world_size}, data_parallel={self.data_parallel}, "
                f"zero_stage={self.zero_stage}, precision={self.precision!r})")

    @property
    def draws_per_step(self) -> int:
        """Batches of a subnet's stream one optimizer step consumes: D ranks x G micro-batches."""
        return self.data_parallel * self.gradient_accumulation

    @property
    def slot(self) -> int:
        return self.rank // self.data_parallel

    def trained_slots(self, ist: ISTModel) -> list[int]:
        """The subnet slot this rank's group trains."""
        return [self.slot]

    def make_stepper(self, subnet: nn.Module, optimizer: torch.optim.Optimizer) -> _EngineStep:
        """The subnet's steps run through a fresh DeepSpeed engine over this rank's group."""
        return _EngineStep(self, subnet, optimizer)

    def engine_config(self) -> dict:
        """The DeepSpeed config of every subnet's engine."""
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # batches come from fit's data; the size is informational
            "gradient_accumulation_steps": self.gradient_accumulation,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,  # the user's torch optimizer, as in fit(optimizer=...)
            "steps_per_print": 2 ** 31,
            "wall_clock_breakdown": False,
        }
        if self.precision == "bf16":
            config["bf16"] = {"enabled": True}
        elif self.precision == "fp16":
            config["fp16"] = {"enabled": True}
        config.update(self.extra_config)
        return config

    # -- set-up -------------------------------------------------------------------------
    def connect(self) -> None:
        """Join the process group through DeepSpeed (``deepspeed.init_distributed``)."""
        deepspeed = _deepspeed()
        import deepspeed.comm as dcomm

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        check_shm_op_build()  # DeepSpeed's comm init builds its op on first use
        init_distributed(self.timeout, backend)  # our store on MASTER_ADDR only; DeepSpeed reuses the group
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=self.timeout))
        self.rank, self.world_size = dcomm.get_rank(), dcomm.get_world_size()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.comm_device = self.device

    def check_world(self, subnets: int) -> None:
        """The world must be ``subnets x data_parallel`` ranks."""
        D = self.data_parallel
        if self.world_size != subnets * D:
            raise ISTError(
                f"the deepspeed backend runs {subnets} subnets x {D} data-parallel ranks = {subnets * D} ranks, "
                f"but the world has {self.world_size}. Launch {subnets * D} processes, or set data_parallel "
                f"(--data-parallel) to world / subnets."
            )

    def create_groups(self, subnets: int) -> None:
        """One data-parallel group per subnet and one group per rank (DeepSpeed's model-parallel unit)."""
        import deepspeed.comm as dcomm

        D = self.data_parallel
        # Every rank takes part in creating every group, in the same order.
        groups = [dcomm.new_group(list(range(s * D, (s + 1) * D))) for s in range(subnets)]
        solos = [dcomm.new_group([r]) for r in range(self.world_size)]
        self.group = groups[self.slot]
        self.topology_unit = _GroupTopology(self.rank, D, self.group, solos[self.rank],
                                            list(range(self.slot * D, (self.slot + 1) * D)))

    def load_state(self, ist: ISTModel, start_round: int, checkpoint: ckpt.Checkpoint | None) -> None:
        """Rank 0 holds the full model (as in ``ps``); the other ranks drop theirs."""
        if self.rank == 0:
            self.load_full_model(ist, checkpoint)
        else:
            release_model(ist)

    # -- the round ------------------------------------------------------------------------
    def train_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Run `round` on this rank (every rank calls this with the same round)."""
        import deepspeed.comm as dcomm

        start = time.perf_counter()
        S, D, me = ist.plan.subnets, self.data_parallel, self.rank
        slot, leader = self.slot, self.rank % self.data_parallel == 0
        sent = received = 0
        subnets = ist.decompose(round) if me == 0 else None
        names, specs = self.slot_names(round, slot), self.slot_specs(round, slot)

        # Downlink: rank 0 -> every group's leader, then the leader -> its group.
        works = []
        if me == 0:
            for s in range(1, S):
                state = state_of(subnets[s])
                payload = comm.pack([state[n] for n in self.slot_names(round, s)], device=self.comm_device)
                works.append((dcomm.isend(payload, s * D), payload))
                sent += payload.numel()
        payload = None  # one subnet on one rank: nothing to send
        if D > 1 or me != 0:
            if me == 0:
                state = state_of(subnets[0])
                payload = comm.pack([state[n] for n in names], device=self.comm_device)
            else:
                payload = torch.empty(comm.packed_nbytes(specs), dtype=torch.uint8, device=self.comm_device)
                if leader:
                    dcomm.recv(payload, 0)
                    received += payload.numel()
            if D > 1:
                dcomm.broadcast(payload, src=slot * D, group=self.group)
                if leader:
                    sent += payload.numel() * (D - 1)
                else:
                    received += payload.numel()
        for work, _ in works:
            work.wait()
        if me == 0:
            subnet = subnets[0]
        else:
            subnet = self.instantiate(round, slot, dict(zip(names, comm.unpack(payload, specs))))
        del payload
        central, slices = None, None
        if me == 0 and not self.state_config.plain:
            if getattr(self, "_central", None) is None:
                self._central = CentralState(ist, self.state_config)
            central, slices = self._central, self.round_slices(round)[0]
            central.begin(ist)
        if self.state_config.carry:
            carried, moved = self._state_down(round, central, slices, names)
            sent, received = sent + moved[0], received + moved[1]
            attach(subnet, carried)

        result = train_subnet(slot, subnet)
        self.after_local_training(round, subnet)

        # The group's totals; then uplink: leaders -> rank 0.
        totals = torch.tensor([result.samples, result.loss_sum, -1.0 if result.correct is None else result.correct],
                              dtype=torch.float64, device=self.comm_device)
        if D > 1:
            dcomm.all_reduce(totals, group=self.group)
        samples, loss_sum, correct = totals.tolist()
        group_result = SubnetResult(samples=int(samples), loss_sum=loss_sum,
                                    correct=None if result.correct is None else int(correct), steps=result.steps)
        gradient_bytes = self._gradient_bytes(subnet, result.steps)
        rss, peak = rss_mb(), peak_rss_mb()
        if leader and me != 0:
            state = state_of(subnet)
            update = comm.pack([state[n].detach() for n in names], device=self.comm_device)
            head = torch.tensor([round, samples, loss_sum, correct, result.steps,
                                 -1 if rss is None else rss, -1 if peak is None else peak],
                                dtype=torch.float64, device=self.comm_device)
            dcomm.send(head, 0)
            dcomm.send(update, 0)
            sent += head.numel() * 8 + update.numel()
            if self.state_config.carry:  # the trained optimizer state follows the update
                back, layout = (pack_state(result.optimizer_state, names, device=self.comm_device)
                                if result.optimizer_state else (torch.empty(0, dtype=torch.uint8), 0))
                dcomm.send(torch.tensor([layout, back.numel()], dtype=torch.int64, device=self.comm_device), 0)
                if back.numel():
                    dcomm.send(back, 0)
                sent += 16 + back.numel()
        parameters, sizes = self.slot_sizes(round)
        extra_base = {"topology": "deepspeed", "data_parallel": D, "zero_stage": self.zero_stage,
                      "precision": self.precision}
        if me != 0:
            results = [SubnetResult(0, 0.0, None, 0) for _ in range(S)]
            results[slot] = group_result
            report = ReassembleReport(round, accepted=[slot])
            extra = {**extra_base, "bytes_sent": sent + gradient_bytes, "bytes_received": received + gradient_bytes}
            return RoundResult(round, results, report, parameters, sizes, time.perf_counter() - start, extra)

        # Rank 0: collect the leaders' updates and reassemble.
        results = {0: group_result}
        returned = {0: result.optimizer_state}
        leader_memory: dict[int, tuple[float | None, float | None]] = {0: (rss, peak)}
        leader_bytes: dict[int, tuple[float, float]] = {}
        for s in range(1, S):
            size = comm.packed_nbytes(self.slot_specs(round, s))  # the subnet, down and back up
            head = torch.empty(_HEADER, dtype=torch.float64, device=self.comm_device)
            update = torch.empty(size, dtype=torch.uint8, device=self.comm_device)
            dcomm.recv(head, s * D)
            dcomm.recv(update, s * D)
            received += head.numel() * 8 + update.numel()
            values = head.tolist()
            results[s] = SubnetResult(samples=int(values[1]), loss_sum=values[2],
                                      correct=None if values[3] < 0 else int(values[3]), steps=int(values[4]))
            leader_memory[s] = (values[5] if values[5] >= 0 else None, values[6] if values[6] >= 0 else None)
            leader_bytes[s] = (head.numel() * 8 + size * D, size)  # uplink + broadcast to D - 1; downlink
            self.write_update(round, s, subnets[s], update)
            if self.state_config.carry:
                sizes_back = torch.zeros(2, dtype=torch.int64, device=self.comm_device)
                dcomm.recv(sizes_back, s * D)
                if int(sizes_back[1]):
                    back = torch.empty(int(sizes_back[1]), dtype=torch.uint8, device=self.comm_device)
                    dcomm.recv(back, s * D)
                    returned[s] = unpack_state(back, int(sizes_back[0]))
                received += 16 + int(sizes_back[1])
        home = model_device(ist.model)
        subnets = [s.to(home) for s in subnets]
        report = ist.reassemble(subnets, weights=[max(results[s].samples, 1) for s in range(S)],
                                on_nonfinite="skip")
        if central is not None:
            central.finish(ist, slices, {s: returned.get(s) for s in report.accepted},
                           {s: trained_names(subnets[s]) for s in report.accepted},
                           {s: max(results[s].samples, 1) for s in report.accepted})
        all_results = [results[s] for s in range(S)]
        leader_bytes[0] = (sent, received)
        extra = {
            **extra_base,
            # per subnet group: what its leader sent / received in the exchange, plus its gradient traffic
            "bytes_sent": [leader_bytes[s][0] + gradient_bytes for s in range(S)],
            "bytes_received": [leader_bytes[s][1] + gradient_bytes for s in range(S)],
            "gradient_bytes_per_rank": gradient_bytes,
            "rss_mb": [leader_memory[s][0] for s in range(S)],
            "rss_peak_mb": [leader_memory[s][1] for s in range(S)],
        }
        return RoundResult(round=round, results=all_results, report=report, parameters_per_subnet=parameters,
                           bytes_per_subnet=sizes, seconds=time.perf_counter() - start, extra=extra)

    def _state_down(self, round: int, central: CentralState | None, slices, names: list[str]):
        """The optimizer state each group starts the round with, as the payload goes: rank 0 -> leaders ->
        their groups. Returns (this rank's state or None, (bytes sent, bytes received))."""
        import deepspeed.comm as dcomm

        S, D, me = self.ist.plan.subnets, self.data_parallel, self.rank
        slot, leader = self.slot, me % D == 0
        sent = received = 0
        works = []
        if me == 0:
            for s in range(1, S):
                state = central.for_subnet(slices, s, self.slot_names(round, s))
                buffer, layout = (pack_state(state, self.slot_names(round, s), device=self.comm_device) if state
                                  else (torch.empty(0, dtype=torch.uint8), 0))
                head = torch.tensor([layout, buffer.numel()], dtype=torch.int64, device=self.comm_device)
                works.append((dcomm.isend(head, s * D), head))
                if buffer.numel():
                    works.append((dcomm.isend(buffer, s * D), buffer))
                sent += 16 + buffer.numel()
            state = central.for_subnet(slices, 0, names)
            buffer, layout = (pack_state(state, names, device=self.comm_device) if state
                              else (torch.empty(0, dtype=torch.uint8), 0))
            head = torch.tensor([layout, buffer.numel()], dtype=torch.int64, device=self.comm_device)
        else:
            head = torch.zeros(2, dtype=torch.int64, device=self.comm_device)
            if leader:
                dcomm.recv(head, 0)
                received += 16
        if D > 1:
            dcomm.broadcast(head, src=slot * D, group=self.group)
        size = int(head[1])
        if me != 0 and size:
            buffer = torch.empty(size, dtype=torch.uint8, device=self.comm_device)
            if leader:
                dcomm.recv(buffer, 0)
                received += size
        if D > 1 and size:
            dcomm.broadcast(buffer, src=slot * D, group=self.group)
            if leader:
                sent += size * (D - 1)
            else:
                received += size
        for work, _ in works:
            work.wait()
        return (unpack_state(buffer, int(head[0])) if size else None), (sent, received)

    def _gradient_bytes(self, subnet: nn.Module, steps: int) -> float:
        """Bytes one rank moves for its group's gradient averaging over `steps` optimizer steps."""
        if self.data_parallel == 1:
            return 0.0
        nbytes = sum(p.numel() * p.element_size() for p in subnet.parameters() if p.requires_grad)
        return comm.ring_allreduce_bytes(nbytes, self.data_parallel) * steps

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, ist: ISTModel, root: str | os.PathLike, round: int, rank_state: dict,
                        manifest: dict, keep: int | None = None) -> None:
        """Rank 0 writes the full model; every rank its data position and RNG state; then the manifest."""
        import deepspeed.comm as dcomm

        directory = ckpt.round_dir(root, round)
        if self.rank == 0:
            ckpt.save_full(ist, directory, round)
        ckpt.save_rank(directory, self.rank, dict(rank_state))
        dcomm.barrier()
        if self.rank == 0:
            ckpt.write_manifest(root, round, {**manifest, "format": ckpt.FULL, "world_size": self.world_size,
                                              "data_parallel": self.data_parallel}, keep)
        dcomm.barrier()
