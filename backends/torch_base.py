"""What the torch.distributed backends share: process group, world checks, heartbeat, subnet helpers.

One subnet per rank, every rank running the same script (``torchrun`` or
``istfx train``, which starts the ranks itself on this machine). Each rank
compiles the same model with the same seed, so every rank derives the same
assignment for every round without a message. World size = number of
subnets; rank ``r`` trains subnet slot ``r``. gloo on CPU, NCCL on GPU (the
device comes from ``LOCAL_RANK``).

:class:`TorchDistBackend` is the base of the topologies, one class each:

- :class:`~istfx.backends.torch_ps.TorchPSBackend` (``"ps"``): rank 0 holds
  the full model and exchanges subnets with the workers; survives failed
  workers;
- :class:`~istfx.backends.torch_sharded.TorchShardedBackend`
  (``"sharded"``): no rank holds the full model; one all-to-all per round;
- :class:`~istfx.backends.deepspeed_engine.DeepSpeedBackend` builds on the
  same hooks.

``TorchDistBackend("ps" | "sharded", ...)`` returns the topology's class
(``isinstance(backend, TorchDistBackend)`` holds for every one of them).

Writing a topology: subclass :class:`TorchDistBackend`, set ``topology``,
implement :meth:`~TorchDistBackend.load_state` and
:meth:`~TorchDistBackend.train_round`, and override the hooks that differ:
:meth:`~TorchDistBackend.connect` (join the process group),
:meth:`~TorchDistBackend.check_world` (is the world the right size; checks
only), :meth:`~TorchDistBackend.create_groups` (sub-groups, created by every
rank in the same order), and the :class:`~istfx.runtime.backend_api.Backend`
methods (``full_model``, ``save_checkpoint``, ``finish``, ...).
:meth:`~TorchDistBackend.after_local_training` runs on every rank between a
subnet's training and its update leaving the rank; it does nothing here, and
the tests override it to inject faults (a killed, hung or NaN-writing rank).
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import os
import socket
import threading
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from istfx.core.compiler import ISTModel, SubnetInfo
from istfx.core.slicing import RoundSlices
from istfx.errors import ISTError
from istfx.runtime import checkpoint as ckpt
from istfx.runtime import comm
from istfx.runtime.numbers import finite
from istfx.runtime.backend_api import Backend, RankState, RoundResult, TrainSubnet

from .model_storage import is_released, materialize_model, state_of

__all__ = ["TOPOLOGIES", "Heartbeat", "TorchDistBackend", "init_distributed", "is_comm_error", "message_tag",
           "rendezvous_store"]

TOPOLOGIES = ("ps", "sharded")


# -- process group ---------------------------------------------------------------------------
def init_distributed(timeout: float = 1800.0, backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group once, from torchrun's environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and
    ``LOCAL_RANK`` for the GPU). gloo on CPU, NCCL when CUDA is available.
    Returns ``(rank, world_size, device)``.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ISTError(
                f"the torch backend runs under torchrun (or `istfx train`): {', '.join(missing)} not set. "
                "Start the script with `torchrun --nproc-per-node S script.py` or use `istfx train`."
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        delta = datetime.timedelta(seconds=timeout)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent holds the store
            dist.init_process_group(backend, timeout=delta)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            if backend == "gloo" and _is_loopback(addr):  # gloo's own sockets on loopback too
                os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
            listen_fd = _listen(addr, port) if rank == 0 else None
            store = dist.TCPStore(addr, port, world, rank == 0, delta, wait_for_workers=False,
                                  master_listen_fd=listen_fd)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=delta)
    return dist.get_rank(), dist.get_world_size(), device


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr) if addr == "localhost" else addr).is_loopback
    except (ValueError, OSError):
        return False


def _loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux)."""
    for name in sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/sys/class/net/{name}/flags", encoding="ascii") as flags:
                if int(flags.read(), 16) & 0x8:  # IFF_LOOPBACK
                    return name
    return "lo"


def _listen(addr: str, port: int) -> int:
    """A socket listening on `addr`:`port` only (not every interface), as a file descriptor for the store.

    MASTER_ADDR is where the store listens: 127.0.0.1 for ``istfx train`` on
    one machine, the address the other nodes reach on a cluster.
    """
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise ISTError(f"MASTER_ADDR {addr!r} does not resolve ({exc.strerror}): set it to this node's "
                       "address (127.0.0.1 on one machine).") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not an active listener's port, only TIME_WAIT
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ISTError(f"cannot listen on {addr}:{port} for the rendezvous ({exc.strerror}): another process "
                       "uses that port; pass another --master-port (MASTER_PORT) or leave it out for a free one.") \
            from None
    return sock.detach()


def rendezvous_store(timeout: float) -> dist.Store:
    """A new client of the job's rendezvous store, under a per-attempt prefix."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("ISTFX_RUN_ID", "istfx"))
    return dist.PrefixStore(f"istfx/{run}/{attempt}/", store)


def is_comm_error(exc: BaseException) -> bool:
    """A failure of the process group (a peer died, closed its connection or timed out)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(k in text for k in ("Connection closed", "Connection reset", "timed out", "Timed out", "gloo",
                                   "NCCL", "Broken pipe"))


def message_tag(round: int, kind: int) -> int:
    """The point-to-point tag of message `kind` (0-7) of `round`: a late message never matches another round."""
    return (round % 1_000_000) * 8 + kind


class Heartbeat(threading.Thread):
    """Bumps a counter under `key` in the rendezvous store every `interval` seconds while this process lives."""

    def __init__(self, key: str, interval: float, timeout: float) -> None:
        super().__init__(name="istfx-heartbeat", daemon=True)
        self.key, self.interval, self.timeout = key, interval, timeout
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            store = rendezvous_store(self.timeout)
        except Exception:  # the job is going down
            return
        beats = 0
        while not self.stop.is_set():
            beats += 1
            try:
                store.set(self.key, str(beats))
            except Exception:
                return
            self.stop.wait(self.interval)


# -- the base ------------------------------------------------------------------------------------
def _topology_class(topology: Any) -> type[TorchDistBackend]:
    from .torch_ps import TorchPSBackend
    from .torch_sharded import TorchShardedBackend

    classes = {"ps": TorchPSBackend, "sharded": TorchShardedBackend}
    key = str(topology).strip().lower()
    if key not in classes:
        raise ISTError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}.")
    return classes[key]


class TorchDistBackend(Backend):
    """IST rounds on torch.distributed ranks, one subnet per rank (see the module docstring).

    ``TorchDistBackend(topology, **options)`` builds the topology's class:
    ``"ps"`` -> :class:`~istfx.backends.torch_ps.TorchPSBackend`,
    ``"sharded"`` -> :class:`~istfx.backends.torch_sharded.TorchShardedBackend`
    (see those for the options).

    Args (every topology):
        compress: ``None``, ``"int8"`` or ``"int4"``: quantize the exchanged
            slices with per-row scales (:mod:`istfx.runtime.comm`).
        timeout: the process group's timeout (collectives and blocking receives).
        init_from: a safetensors file with the initial model state (from
            :func:`istfx.runtime.checkpoint.atomic_save`), read instead of ``ist.model``.
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available).

    Attributes set by :meth:`prepare`: ``rank``, ``world_size``, ``device``
    (where subnets train), ``comm_device`` (where exchanged buffers live),
    ``ist``, and per state tensor name ``dtypes``, ``shapes``,
    ``requires_grad``; ``trainable`` (names of the state trained), ``constants``.
    """

    name = "torch"
    topology: str | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> TorchDistBackend:
        if cls is TorchDistBackend:  # the factory: the topology's class
            cls = _topology_class(kwargs["topology"] if "topology" in kwargs else args[0] if args else "ps")
        return super().__new__(cls)

    def __init__(
        self,
        *,
        compress: str | None = None,
        timeout: float = 1800.0,
        init_from: str | os.PathLike | None = None,
        backend: str | None = None,
    ) -> None:
        try:
            self.compress = comm.parse_compress(compress)
        except ValueError as exc:
            raise ISTError(str(exc)) from None
        self.timeout = finite("timeout", timeout, above=0.0)
        self.init_from = init_from
        self.pg_backend = backend
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cpu")
        self.comm_device = self.device
        self.ist: ISTModel | None = None
        self.prepared = False
        self.heartbeat: Heartbeat | None = None
        self._round_cache: dict[int, tuple[RoundSlices, list[list[int]]]] = {}

    def _check_topology(self, given: Any) -> None:
        """The topology classes take the factory's positional `topology`; it must name their own."""
        if str(given).strip().lower() != self.topology:
            raise ISTError(f"{type(self).__name__} runs the {self.topology!r} topology, got topology={given!r}: "
                           f"use TorchDistBackend({given!r}) (one of {', '.join(TOPOLOGIES)}).")

    # -- identity ----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def trained_slots(self, ist: ISTModel) -> list[int]:
        """The subnet slot this rank trains: its rank."""
        return [self.rank]

    def ranks(self, ist: ISTModel) -> int:
        return self.world_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}/{self.world_size})"

    # -- hooks ----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Hook: join the process group; set ``rank``, ``world_size``, ``device`` and ``comm_device``."""
        self.rank, self.world_size, self.device = init_distributed(self.timeout, self.pg_backend)
        self.comm_device = self.device

    def check_world(self, subnets: int) -> None:
        """Hook: raise :class:`ISTError` unless the world fits `subnets` subnets. Checks only, creates nothing."""
        if self.world_size != subnets:
            raise ISTError(
                f"the torch backend runs one subnet per rank: world size {self.world_size} != "
                f"{subnets} subnets. Launch {subnets} processes (torchrun --nproc-per-node {subnets}, or `istfx train`, which starts them)."
            )

    def create_groups(self, subnets: int) -> None:
        """Hook: create process sub-groups (every rank, same order), after :meth:`check_world`. None here."""

    @abstractmethod
    def load_state(self, ist: ISTModel, start_round: int, checkpoint: ckpt.Checkpoint | None) -> None:
        """Hook: take this rank's part of the model for `start_round` (from `checkpoint`, ``init_from`` or
        ``ist.model``) and drop what it does not keep."""

    @abstractmethod
    def train_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Hook: run `round` on this rank (every rank calls it with the same round), once prepared."""

    def after_local_training(self, round: int, subnet: nn.Module) -> None:
        """Hook: runs on every rank after its subnet trained, before the update leaves the rank.

        Does nothing; tests override it to inject faults (kill, hang or NaN
        a rank in a given round) where a real failure would strike.
        """

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self, ist: ISTModel, start_round: int = 0,
                checkpoint: ckpt.Checkpoint | None = None) -> RankState | None:
        """Join the process group and take this rank's part of the model for `start_round`.

        Loads from `checkpoint` (or ``init_from``) when given; otherwise from
        ``ist.model``. Ranks that do not hold the full model drop it here.
        Returns this rank's saved ``(metadata, tensors)`` from `checkpoint`
        (data positions, RNG state), or None.
        """
        self.connect()
        plan = ist.plan
        self.check_world(plan.subnets)
        self.create_groups(plan.subnets)
        self.ist = ist
        self._round_cache.clear()
        self.dtypes = {n: ist.state_tensor(n).dtype for n in plan.state_kinds}
        self.shapes = {n: tuple(plan.state_shapes[n]) for n in plan.state_kinds}
        self.requires_grad = {n: p.requires_grad for n, p in ist.model.named_parameters()}
        self.trainable = list(ist.trainable_state)
        constant_names = [n for n, k in plan.state_kinds.items() if k == "constant"]
        self.constants = {n: ist.state_tensor(n).detach().clone() for n in constant_names}
        if any(t.is_meta for t in self.constants.values()):
            raise ISTError("the model's tensor constants are on the meta device: build the model for real "
                           "on this rank (init_from does not carry graph constants).")
        rank_state = checkpoint.rank_state(self.rank) if checkpoint is not None else None
        self.load_state(ist, start_round, checkpoint)
        self.prepared = True
        ready = os.environ.get("ISTFX_READY_FILE")
        if ready and self.rank == 0:  # tells istfx.runtime.launch that every rank joined
            with contextlib.suppress(OSError):
                open(ready, "w", encoding="ascii").close()
        return rank_state

    def run_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Run `round` on this rank (every rank calls this with the same round); prepares on first use."""
        if not self.prepared or ist is not self.ist:
            self.prepare(ist, round)
        return self.train_round(ist, round, train_subnet)

    def load_full_model(self, ist: ISTModel, checkpoint: ckpt.Checkpoint | None) -> None:
        """For a rank that holds the full model: fill ``ist.model`` from `checkpoint`, ``init_from`` or as built."""
        if checkpoint is not None or self.init_from is not None:
            materialize_model(ist)
            if checkpoint is not None:
                ckpt.load_into(ist, checkpoint)
            else:
                with ckpt.TensorFile(self.init_from) as handle:
                    ckpt.load_state(ist, handle, self.init_from)
        elif is_released(ist):
            raise ISTError(f"rank 0 holds the full model in the {self.topology} topology: build it for real "
                           "or pass init_from.")

    @contextlib.contextmanager
    def full_model(self, ist: ISTModel) -> Iterator[nn.Module | None]:
        """The full model on rank 0 (None on the others), for evaluation. Every rank must enter it."""
        yield ist.model if self.rank == 0 else None

    def start_heartbeat(self, timeout: float) -> None:
        """Publish this rank's heartbeat (``hb/RANK`` in the store) about ten times per `timeout`."""
        self.heartbeat = Heartbeat(f"hb/{self.rank}", min(1.0, timeout / 10), self.timeout)
        self.heartbeat.start()

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        if self.heartbeat is not None:
            self.heartbeat.stop.set()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    # -- a round's subnets (the same on every rank) -------------------------------------------------
    def round_slices(self, round: int) -> tuple[RoundSlices, list[list[int]]]:
        """The slices of `round` and its block assignment (the last few rounds are cached)."""
        if round not in self._round_cache:
            if len(self._round_cache) > 4:
                self._round_cache.pop(min(self._round_cache))
            self._round_cache[round] = (self.ist.slices(round), self.ist.plan.block_assignment(round))
        return self._round_cache[round]

    def slot_names(self, round: int, slot: int) -> list[str]:
        """Parameters and buffers slot `slot` trains in `round` (all of them unless blocks are dealt out)."""
        if not self.ist.plan.blocks:
            return list(self.trainable)  # no template needed: ranks build only their own slot's
        _, held = self.round_slices(round)
        used = self.ist.template(slot, held[slot]).used
        return [n for n in self.trainable if n in used]

    def slice_shape(self, slices: RoundSlices, name: str, slot: int) -> tuple[int, ...]:
        """Shape of slot `slot`'s slice of tensor `name` under `slices`."""
        return slices.held_shape(name, self.shapes[name], slot)

    def slot_specs(self, round: int, slot: int) -> list[comm.Spec]:
        """Shapes and dtypes of the tensors of :meth:`slot_names`, in that order (what a packed subnet holds)."""
        slices, _ = self.round_slices(round)
        return [comm.Spec(self.slice_shape(slices, n, slot), self.dtypes[n]) for n in self.slot_names(round, slot)]

    def slot_sizes(self, round: int) -> tuple[list[int], list[int]]:
        """(parameters, bytes of parameters and buffers) of every slot's subnet in `round`."""
        parameters, sizes = [], []
        kinds = self.ist.plan.state_kinds
        for s in range(self.ist.plan.subnets):
            specs = dict(zip(self.slot_names(round, s), self.slot_specs(round, s)))
            parameters.append(sum(math.prod(sp.shape) for n, sp in specs.items() if kinds[n] == "parameter"))
            sizes.append(sum(math.prod(sp.shape) * torch.empty((), dtype=sp.dtype).element_size()
                             for sp in specs.values()))
        return parameters, sizes

    def instantiate(self, round: int, slot: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Slot `slot`'s subnet of `round` built around `tensors` (its trained state, by name)."""
        slices, held = self.round_slices(round)
        template = self.ist.template(slot, held[slot])
        values = dict(tensors)
        for name, value in self.constants.items():
            if name in template.used:
                values[name] = slices.take(name, value, slot).to(self.device)
        subnet = template.instantiate(values, self.requires_grad)
        subnet.istfx_subnet = SubnetInfo(self.ist.plan.token, round, slot)
        return subnet

    def write_update(self, round: int, slot: int, subnet: nn.Module, update: torch.Tensor) -> None:
        """Write a packed update of slot `slot` into `subnet` (a copy held here): values, or with
        ``compress`` quantized deltas added to the floating tensors."""
        names = self.slot_names(round, slot)
        values = comm.unpack(update, self.slot_specs(round, slot), self.compress)
        state = state_of(subnet)
        with torch.no_grad():
            for name, value in zip(names, values):
                target = state[name]
                value = value.to(target.device)
                if self.compress is not None and target.is_floating_point():
                    target.add_(value.to(target.dtype))
                else:
                    target.copy_(value.to(target.dtype))
