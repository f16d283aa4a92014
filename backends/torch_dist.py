"""The torch.distributed backend: one subnet per rank, every rank running the same script.

Launch with ``torchrun`` (or ``istfx train``, which starts the ranks itself on
this machine). Each rank compiles the same model with the same seed, so every
rank derives the same assignment for every round without a message. World
size = number of subnets; rank ``r`` trains subnet slot ``r``. gloo on CPU,
NCCL on GPU (the device comes from ``LOCAL_RANK``).

Two topologies:

``ps`` (parameter server, the original IST protocol)
    Rank 0 holds the full model. Each round it decomposes it, sends every
    rank its subnet's parameters and buffers as one flat buffer (point to
    point), trains slot 0 itself, receives the trained slices back and
    reassembles them, weighted by samples. The other ranks hold only the
    subnet of their round. A rank that dies or hangs mid-round is detected
    by a heartbeat and a round timeout: the round completes without it, its
    units keep their previous values (``ISTModel.reassemble`` reports it as
    missing), the rank is excluded from later rounds and the job goes on.
    Completion is signalled through the rendezvous store, never through a
    blocking receive, because a timed-out gloo receive tears down the whole
    process group.

``sharded``
    No rank holds the full model after start-up. Each rank keeps the
    slices it trained last; one ``all_to_all_single`` per round moves every
    unit to its next trainer; shared (uncut) parameters are kept on every
    rank and averaged with one all-reduce (weighted by samples). Elements
    that no subnet trains in a round (the off-diagonal blocks of a tensor
    cut along two split axes, units left out by ``sizes``) are parked at a
    fixed *home* rank (a contiguous block of rows) and fetched from there,
    in the same all-to-all, when a subnet needs them again. A rank holds
    its slice, its share of the homes and the shared tensors: about 1/S of
    the split parameters (1/S + 1/S^2 of a tensor cut along two axes). :meth:`TorchDistBackend.full_model` gathers the
    model on rank 0 only when asked (evaluation), and a sharded checkpoint
    is written without gathering. Needs a disjoint width-only plan (no
    ``overlap``, no dealt-out blocks); a dead rank takes the only copy of its
    units with it, so this topology stops with an error on a fault and is
    resumed from its last checkpoint.

Usage, inside a script started by ``torchrun --nproc-per-node 4``::

    backend = TorchDistBackend("sharded")
    history = istfx.fit(ist, per_subnet_data, rounds=50, local_steps=10, backend=backend)

Every rank calls ``fit``; rank 0 (``backend.is_main``) logs and evaluates.
Each rank draws batches only for its own slot: pass ``fit`` a function
``subnet -> iterable`` (its shard) so that the local backend, given the same
function, sees the same batches.

Every round's ``RoundResult.extra`` reports, per rank, ``bytes_sent`` and
``bytes_received`` (``ps``: the point-to-point messages; ``sharded``: the
all-to-all as measured plus the shared all-reduce and the metrics gather at
ring cost), next to ``ddp_bytes_per_rank`` (one ring all-reduce of the
gradients per local step) and ``local_sgd_bytes_per_rank`` (one of the model
per round) for the same samples, and each rank's resident memory.

Set ``ISTFX_FAULT`` to inject faults in tests: ``kill:RANK:ROUND``,
``hang:RANK:ROUND:SECONDS`` or ``nan:RANK:ROUND`` (comma separated); the
fault strikes after local training, before the update is sent.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from istfx.runtime import checkpoint as ckpt
from istfx.runtime import comm
from istfx.core.compiler import ISTModel, ReassembleReport, SubnetInfo
from istfx.errors import ISTError
from istfx.core.slicing import RoundSlices

from . import RoundResult, SubnetResult, TrainSubnet, model_device

__all__ = ["TorchDistBackend", "TOPOLOGIES", "init_distributed", "peak_rss_mb", "rss_mb", "reset_peak_rss"]

TOPOLOGIES = ("ps", "sharded")

_TRAIN, _STOP = 1, 0
_HEADER = 10  # float64 fields of a worker's result header
_KIND_HEADER, _KIND_PAYLOAD, _KIND_RESULT, _KIND_UPDATE, _KIND_GATHER, _KIND_GATHER_HOME = range(6)
_READ_CHUNK = 32 * 2 ** 20  # bytes of full-width rows read at once at start-up


def _is_comm_error(exc: BaseException) -> bool:
    """A failure of the process group (a peer died, closed its connection or timed out)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(k in text for k in ("Connection closed", "Connection reset", "timed out", "Timed out", "gloo",
                                   "NCCL", "Broken pipe"))


def _tag(round: int, kind: int) -> int:
    return (round % 1_000_000) * 8 + kind


# -- process memory ----------------------------------------------------------------------
def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (since start or the last :func:`reset_peak_rss`), MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-memory count (Linux ``/proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


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
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size(), device


def _store(timeout: float) -> dist.Store:
    """A new client of the job's rendezvous store, under a per-attempt prefix."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("ISTFX_RUN_ID", "istfx"))
    return dist.PrefixStore(f"istfx/{run}/{attempt}/", store)


class _Heartbeat(threading.Thread):
    """Bumps a counter in the store every `interval` seconds while this process lives."""

    def __init__(self, key: str, interval: float, timeout: float) -> None:
        super().__init__(name="istfx-heartbeat", daemon=True)
        self.key, self.interval, self.timeout = key, interval, timeout
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            store = _store(self.timeout)
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


# -- faults (test hook) ----------------------------------------------------------------------
class _Faults:
    """Faults injected through ``ISTFX_FAULT`` (``kind:rank:round[:seconds]``, comma separated)."""

    def __init__(self, rank: int, text: str | None) -> None:
        self.entries: list[tuple[str, int, float]] = []
        for part in (text or "").split(","):
            fields = part.strip().split(":")
            if len(fields) < 3:
                continue
            kind, rank_text, round_text = fields[:3]
            if int(rank_text) == rank:
                self.entries.append((kind, int(round_text), float(fields[3]) if len(fields) > 3 else 3600.0))

    def strike(self, round: int, subnet: nn.Module) -> None:
        for kind, at, seconds in self.entries:
            if at != round:
                continue
            if kind == "kill":
                os._exit(17)
            elif kind == "hang":
                time.sleep(seconds)
            elif kind == "nan":
                with torch.no_grad():
                    for p in subnet.parameters():
                        if p.is_floating_point():
                            p.fill_(math.nan)
                            break


# -- model tensors ------------------------------------------------------------------------------
def _replace_state(modules: list[nn.Module], make) -> dict[int, torch.Tensor]:
    """Replace parameters and buffers of `modules` by ``make(old)`` (None: keep), preserving ties.

    Parameters stay parameters (same ``requires_grad``); a tensor reached
    under several names (tied weights, a module shared by two trees) is
    replaced once and shared again. Returns ``{id(old): new}``.
    """
    memo: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for key, old in list(table.items()):
                    if old is None:
                        continue
                    if id(old) not in memo:
                        value = make(old)
                        if value is None:
                            memo[id(old)] = old
                        elif isinstance(old, nn.Parameter):
                            memo[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad)
                        else:
                            memo[id(old)] = value
                    table[key] = memo[id(old)]
    return memo


def _released(ist: ISTModel) -> bool:
    return any(t.is_meta for t in [*ist.model.parameters(), *ist.model.buffers()])


def release_model(ist: ISTModel) -> None:
    """Drop the full-size parameters and buffers of ``ist.model`` (and the captured copy) to ``meta``.

    The modules keep their structure (shapes, dtypes, ties) without storage;
    :func:`materialize_model` gives them storage again.
    """
    def to_meta(t: torch.Tensor) -> torch.Tensor | None:
        return None if t.is_meta else torch.empty(t.shape, dtype=t.dtype, device="meta")

    memo = _replace_state([ist.model, ist.captured.module], to_meta)
    program_state = getattr(ist.captured.program, "state_dict", None)
    if isinstance(program_state, dict):
        for key, value in list(program_state.items()):
            if isinstance(value, torch.Tensor) and not value.is_meta:
                program_state[key] = memo.get(id(value), to_meta(value))


def materialize_model(ist: ISTModel, device: torch.device | str = "cpu") -> None:
    """Give a released (or meta-built) ``ist.model`` real, uninitialised storage on `device`."""
    def real(t: torch.Tensor) -> torch.Tensor | None:
        return torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_meta else None

    _replace_state([ist.model], real)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return state


def _finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _open_index(index: list[torch.Tensor | None], shape) -> tuple:
    rank = len(index)
    out = []
    for dim, (i, size) in enumerate(zip(index, shape)):
        i = torch.arange(size, device=i.device if i is not None else None) if i is None else i
        view = [1] * rank
        view[dim] = -1
        out.append(i.view(view))
    return tuple(out)


def _select(tensor: torch.Tensor, index: list[torch.Tensor | None]) -> torch.Tensor:
    out = tensor
    for dim, i in enumerate(index):
        if i is not None:
            out = out.index_select(dim, i.to(out.device))
    return out if out is not tensor else tensor.clone()


# Elements gathered or scattered at once: bounds the temporaries of the exchange.
_CHUNK = int(os.environ.get("ISTFX_EXCHANGE_CHUNK", 1 << 18))


def _row_chunks(rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, _CHUNK // max(1, row_elems))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def _rows_of(index: list[torch.Tensor | None], shape, a: int, b: int) -> list[torch.Tensor | None]:
    first = index[0][a:b] if index[0] is not None else torch.arange(a, b)
    return [first, *index[1:]]


def _take_block(base: torch.Tensor, index: list[torch.Tensor | None]) -> torch.Tensor:
    """``base`` restricted to `index` (per dimension, None = all), gathered a few rows at a time."""
    sizes = [base.shape[d] if i is None else len(i) for d, i in enumerate(index)]
    out = torch.empty(sizes, dtype=base.dtype, device=base.device)
    for a, b in _row_chunks(sizes[0], math.prod(sizes[1:])):
        out[a:b] = _select(base, _rows_of(index, base.shape, a, b))
    return out


def _put_block(base: torch.Tensor, index: list[torch.Tensor | None], value: torch.Tensor) -> None:
    """Write `value` into the block of `base` that `index` selects, a few rows at a time."""
    for a, b in _row_chunks(value.shape[0], math.prod(value.shape[1:])):
        rows = _rows_of(index, base.shape, a, b)
        base[_open_index([None if i is None else i.to(base.device) for i in rows], base.shape)] = \
            value[a:b].to(base.dtype)


def _mask_rows(mask: torch.Tensor, a: int, b: int, shape) -> torch.Tensor:
    part = mask[a:b] if mask.shape[0] > 1 else mask
    return part.expand((b - a, *shape[1:]))


def _masked_take(base, index, mask, full) -> torch.Tensor:
    """The elements of block `index` of `base` where `mask` (broadcast to `full`) is set, row-major."""
    parts = []
    for a, b in _row_chunks(full[0], math.prod(full[1:])):
        sub = _select(base, _rows_of(index, base.shape, a, b))
        parts.append(sub.masked_select(_mask_rows(mask, a, b, full).to(sub.device)))
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def _masked_put(base, index, mask, full, values: torch.Tensor) -> None:
    """Write `values` (row-major) into the elements of block `index` of `base` where `mask` is set."""
    offset = 0
    for a, b in _row_chunks(full[0], math.prod(full[1:])):
        rows = [None if i is None else i.to(base.device) for i in _rows_of(index, base.shape, a, b)]
        sub = _select(base, rows)
        keep = _mask_rows(mask, a, b, full).to(sub.device)
        count = int(keep.sum())
        if count:
            sub.masked_scatter_(keep, values[offset:offset + count].to(sub.dtype))
            base[_open_index(rows, base.shape)] = sub
        offset += count


class _FileSource:
    """Rows of tensors in a safetensors file, read without loading (or mapping) the rest."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = ckpt.TensorFile(path)

    def rows(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        return self.file.rows(name, rows)


class _ModelSource:
    def __init__(self, ist: ISTModel) -> None:
        self.ist = ist

    def rows(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        full = self.ist.state_tensor(name).detach()
        return full.clone() if rows is None else full.index_select(0, rows)


# -- the backend ---------------------------------------------------------------------------------
class TorchDistBackend:
    """IST rounds on torch.distributed ranks, one subnet per rank (see the module docstring).

    Args:
        topology: ``"ps"`` (rank 0 holds the model) or ``"sharded"`` (no rank does).
        compress: ``None``, ``"int8"`` or ``"int4"``: quantize the exchanged
            slices with per-row scales (:mod:`istfx.runtime.comm`). With ``ps`` the
            downlink carries quantized weights and the uplink quantized
            updates (trained minus received), added to rank 0's exact copy;
            with ``sharded`` moved units are quantized (units that stay on
            their rank and the shared all-reduce are exact).
        round_timeout: ``ps``: seconds rank 0 waits for a round's results
            before going on without the missing ranks.
        heartbeat_timeout: ``ps``: a rank whose heartbeat stops for this long
            is taken as dead before the round timeout (None: off).
        timeout: the process group's timeout (collectives and blocking receives).
        init_from: a safetensors file with the initial model state (from
            :func:`istfx.runtime.checkpoint.atomic_save`); ranks then read only the
            rows they need and never materialise the full model.
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available).
    """

    name = "torch"

    def __init__(
        self,
        topology: str = "ps",
        *,
        compress: str | None = None,
        round_timeout: float = 300.0,
        heartbeat_timeout: float | None = 60.0,
        timeout: float = 1800.0,
        init_from: str | os.PathLike | None = None,
        backend: str | None = None,
    ) -> None:
        topology = str(topology).strip().lower()
        if topology not in TOPOLOGIES:
            raise ISTError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}.")
        try:
            self.compress = comm.parse_compress(compress)
        except ValueError as exc:
            raise ISTError(str(exc)) from None
        self.topology = topology
        self.round_timeout = float(round_timeout)
        self.heartbeat_timeout = None if not heartbeat_timeout else float(heartbeat_timeout)
        self.timeout = float(timeout)
        self.init_from = init_from
        self.pg_backend = backend
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cpu")
        self.active = True  # False once rank 0 excluded this rank (ps)
        self.ist: ISTModel | None = None
        self._prepared = False
        self._faults = _Faults(self.rank, os.environ.get("ISTFX_FAULT"))
        self._round_cache: dict[int, tuple[RoundSlices, list[list[int]]]] = {}
        self._graveyard: list[Any] = []  # abandoned works and their buffers stay alive
        self._heartbeat: _Heartbeat | None = None
        self.failed: dict[int, str] = {}  # ps, rank 0: excluded ranks and why
        self._stopped: set[int] = set()  # ps, rank 0: excluded ranks already told to stop

    # -- identity ---------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def slots(self) -> list[int]:
        """The subnet slots this rank trains."""
        return [self.rank]

    def __repr__(self) -> str:
        return f"TorchDistBackend({self.topology!r}, rank={self.rank}/{self.world_size})"

    # -- set-up -------------------------------------------------------------------------
    def _connect(self) -> None:
        self.rank, self.world_size, self.device = init_distributed(self.timeout, self.pg_backend)
        self._faults = _Faults(self.rank, os.environ.get("ISTFX_FAULT"))
        self.comm_device = self.device

    def _check_world(self, subnets: int) -> None:
        if self.world_size != subnets:
            raise ISTError(
                f"the torch backend runs one subnet per rank: world size {self.world_size} != "
                f"{subnets} subnets. Launch {subnets} processes (--nproc {subnets})."
            )

    def prepare(self, ist: ISTModel, start_round: int = 0, checkpoint: ckpt.Checkpoint | None = None):
        """Join the process group and take this rank's part of the model for `start_round`.

        Loads from `checkpoint` (or ``init_from``) when given; otherwise from
        ``ist.model``. Ranks that do not hold the full model drop it here.
        Returns this rank's saved ``(metadata, tensors)`` from `checkpoint`
        (data positions, RNG state), or None.
        """
        self._connect()
        plan = ist.plan
        self._check_world(plan.subnets)
        self.ist = ist
        self.dtypes = {n: ist.state_tensor(n).dtype for n in plan.state_kinds}
        self.shapes = {n: tuple(plan.state_shapes[n]) for n in plan.state_kinds}
        self.requires_grad = {n: p.requires_grad for n, p in ist.model.named_parameters()}
        self.trainable = list(ist.trainable_state)
        constant_names = [n for n, k in plan.state_kinds.items() if k == "constant"]
        self.constants = {n: ist.state_tensor(n).detach().clone() for n in constant_names}
        if any(t.is_meta for t in self.constants.values()):
            raise ISTError("the model's tensor constants are on the meta device: build the model for real "
                           "on this rank (init_from does not carry graph constants).")
        self.parameter_bytes = sum(
            math.prod(self.shapes[n]) * torch.empty((), dtype=self.dtypes[n]).element_size()
            for n, k in plan.state_kinds.items() if k == "parameter"
        )
        rank_state = checkpoint.rank_state(self.rank) if checkpoint is not None else None
        if self.topology == "ps":
            self._ps_prepare(ist, checkpoint)
        else:
            self._sh_prepare(ist, start_round, checkpoint)
        self._prepared = True
        ready = os.environ.get("ISTFX_READY_FILE")
        if ready and self.rank == 0:  # tells istfx.runtime.launch that every rank joined
            with contextlib.suppress(OSError):
                open(ready, "w", encoding="ascii").close()
        return rank_state

    def _round(self, round: int) -> tuple[RoundSlices, list[list[int]]]:
        if round not in self._round_cache:
            if len(self._round_cache) > 4:
                self._round_cache.pop(min(self._round_cache))
            self._round_cache[round] = (self.ist.slices(round), self.ist.plan.block_assignment(round))
        return self._round_cache[round]

    def _slot_names(self, round: int, slot: int) -> list[str]:
        """Parameters and buffers slot `slot` trains in `round` (all of them unless blocks are dealt out)."""
        if not self.ist.plan.blocks:
            return list(self.trainable)  # no template needed: ranks build only their own slot's
        _, held = self._round(round)
        used = self.ist.template(slot, held[slot]).used
        return [n for n in self.trainable if n in used]

    def _slice_shape(self, slices: RoundSlices, name: str, slot: int) -> tuple[int, ...]:
        return tuple(size if i is None else len(i) for size, i in zip(self.shapes[name], slices.indices[slot][name]))

    def _slot_specs(self, round: int, slot: int) -> list[comm.Spec]:
        slices, _ = self._round(round)
        return [comm.Spec(self._slice_shape(slices, n, slot), self.dtypes[n]) for n in self._slot_names(round, slot)]

    def _slot_sizes(self, round: int) -> tuple[list[int], list[int]]:
        """(parameters, bytes of parameters and buffers) of every slot's subnet in `round`."""
        parameters, sizes = [], []
        kinds = self.ist.plan.state_kinds
        for s in range(self.ist.plan.subnets):
            specs = dict(zip(self._slot_names(round, s), self._slot_specs(round, s)))
            parameters.append(sum(math.prod(sp.shape) for n, sp in specs.items() if kinds[n] == "parameter"))
            sizes.append(sum(math.prod(sp.shape) * torch.empty((), dtype=sp.dtype).element_size()
                             for sp in specs.values()))
        return parameters, sizes

    def _instantiate(self, round: int, slot: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        slices, held = self._round(round)
        template = self.ist.template(slot, held[slot])
        values = dict(tensors)
        for name, value in self.constants.items():
            if name in template.used:
                values[name] = slices.take(name, value, slot).to(self.device)
        subnet = template.instantiate(values, self.requires_grad)
        subnet.istfx_subnet = SubnetInfo(self.ist.plan.token, round, slot)
        return subnet

    def _comparison(self, results: list[SubnetResult]) -> dict[str, float]:
        steps = max((r.steps for r in results), default=0)
        world = self.world_size
        return {
            "ddp_bytes_per_rank": comm.data_parallel_bytes(self.parameter_bytes, world, steps),
            "local_sgd_bytes_per_rank": comm.local_sgd_bytes(self.parameter_bytes, world),
            "model_parameter_bytes": self.parameter_bytes,
        }

    # -- the round ------------------------------------------------------------------------
    def run_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Run `round` on this rank (every rank calls this with the same round)."""
        if not self._prepared or ist is not self.ist:
            self.prepare(ist, round)
        if self.topology == "ps":
            if self.rank == 0:
                return self._ps_server_round(ist, round, train_subnet)
            return self._ps_worker_round(ist, round, train_subnet)
        return self._sh_round(ist, round, train_subnet)

    # ==================================================================================
    # ps
    # ==================================================================================
    def _load_full_model(self, ist: ISTModel, checkpoint: ckpt.Checkpoint | None) -> None:
        """Rank 0 of ``ps``: the full model from `checkpoint`, ``init_from`` or as built."""
        if checkpoint is not None or self.init_from is not None:
            materialize_model(ist)
            if checkpoint is not None:
                ckpt.load_into(ist, checkpoint)
            else:
                with ckpt.TensorFile(self.init_from) as handle:
                    ckpt.load_state(ist, handle, self.init_from)
        elif _released(ist):
            raise ISTError("rank 0 holds the full model in the ps topology: build it for real or pass init_from.")

    def _ps_prepare(self, ist: ISTModel, checkpoint: ckpt.Checkpoint | None) -> None:
        self.store = _store(self.timeout)
        if self.rank == 0:
            self._load_full_model(ist, checkpoint)
            now = time.monotonic()
            self._beats = {s: ("", now) for s in range(1, self.world_size)}
        else:
            release_model(ist)
            if self.heartbeat_timeout:
                self._heartbeat = _Heartbeat(f"hb/{self.rank}", min(1.0, self.heartbeat_timeout / 10), self.timeout)
                self._heartbeat.start()

    def _done_key(self, round: int, rank: int) -> str:
        return f"done/{round}/{rank}"

    def _heartbeat_stale(self, rank: int) -> float | None:
        """Seconds since rank's heartbeat last moved, when over the limit; else None."""
        if not self.heartbeat_timeout:
            return None
        key = f"hb/{rank}"
        value = self.store.get(key).decode() if self.store.check([key]) else ""
        seen, when = self._beats[rank]
        now = time.monotonic()
        if value != seen:
            self._beats[rank] = (value, now)
            return None
        return now - when if now - when > self.heartbeat_timeout else None

    def _ps_server_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        start = time.perf_counter()
        world = self.world_size
        subnets = ist.decompose(round)
        traffic = [comm.Traffic() for _ in range(world)]
        for rank in [s for s in self.failed if s not in self._stopped]:
            header = torch.tensor([_STOP, round], dtype=torch.int64, device=self.comm_device)
            with contextlib.suppress(Exception):  # a dead rank refuses; a hung one reads it when it wakes
                self._graveyard.append((dist.isend(header, rank, tag=_tag(round, _KIND_HEADER)), header))
            self._stopped.add(rank)
        live = [s for s in range(1, world) if s not in self.failed]
        sends: list[tuple[int, Any, torch.Tensor]] = []
        receives: dict[int, tuple] = {}
        for s in live:
            names = self._slot_names(round, s)
            state = _state(subnets[s])
            payload = comm.pack([state[n] for n in names], self.compress, device=self.comm_device)
            header = torch.tensor([_TRAIN, round], dtype=torch.int64, device=self.comm_device)
            for tensor, kind in ((header, _KIND_HEADER), (payload, _KIND_PAYLOAD)):
                sends.append((s, dist.isend(tensor, s, tag=_tag(round, kind)), tensor))
                traffic[0].add(sent=comm.tensor_nbytes(tensor))
                traffic[s].add(received=comm.tensor_nbytes(tensor))
        # Receives are posted after every send: NCCL runs a pair's operations in the order posted.
        for s in live:
            result_header = torch.zeros(_HEADER, dtype=torch.float64, device=self.comm_device)
            update = torch.empty(comm.packed_nbytes(self._slot_specs(round, s), self.compress),
                                 dtype=torch.uint8, device=self.comm_device)
            receives[s] = (
                dist.irecv(result_header, s, tag=_tag(round, _KIND_RESULT)), result_header,
                dist.irecv(update, s, tag=_tag(round, _KIND_UPDATE)), update,
            )
        home = model_device(ist.model)
        results: dict[int, SubnetResult] = {0: train_subnet(0, subnets[0])}
        subnets[0].to(home)
        memory: dict[int, tuple[float | None, float | None]] = {0: (rss_mb(), peak_rss_mb())}
        failed_now: dict[int, str] = {}
        deadline = start + self.round_timeout
        pending = set(live)
        while pending:
            for s in sorted(pending):
                key = self._done_key(round, s)
                if self.store.check([key]):
                    work_h, head, work_u, update = receives[s]
                    try:
                        work_h.wait()
                        work_u.wait()
                    except Exception as exc:  # the rank went away while sending
                        failed_now[s] = f"connection lost: {str(exc).splitlines()[0][:160]}"
                        self._graveyard.append(receives[s])
                        pending.discard(s)
                        continue
                    with contextlib.suppress(Exception):
                        self.store.delete_key(key)
                    values = head.double().cpu().tolist()
                    results[s] = SubnetResult(
                        samples=int(values[1]), loss_sum=values[2],
                        correct=None if values[3] < 0 else int(values[3]), steps=int(values[4]),
                    )
                    memory[s] = (values[5] if values[5] >= 0 else None, values[6] if values[6] >= 0 else None)
                    traffic[s].add(sent=head.numel() * 8 + update.numel())
                    traffic[0].add(received=head.numel() * 8 + update.numel())
                    self._ps_write_back(round, s, subnets[s], update)
                    pending.discard(s)
                else:
                    stale = self._heartbeat_stale(s)
                    if stale is not None:
                        failed_now[s] = f"rank {s} died: no heartbeat for {stale:.1f}s"
                        self._graveyard.append(receives[s])
                        pending.discard(s)
            if pending and time.perf_counter() > deadline:
                for s in sorted(pending):
                    failed_now[s] = f"no result within the round timeout ({self.round_timeout:g}s)"
                    self._graveyard.append(receives[s])
                pending.clear()
            if pending:
                time.sleep(0.002)
        for s, work, tensor in sends:
            if s in failed_now:
                self._graveyard.append((work, tensor))
            else:
                work.wait()
        for s, reason in failed_now.items():
            self.failed[s] = f"round {round}: {reason}"
            warnings.warn(f"istfx: rank {s} left out of round {round} and excluded: {reason}", RuntimeWarning,
                          stacklevel=2)
        accepted = sorted(results)
        report = ist.reassemble(
            [subnets[s] for s in accepted], weights=[max(results[s].samples, 1) for s in accepted],
            on_nonfinite="skip",
        )
        parameters, sizes = self._slot_sizes(round)
        all_results = [results.get(s, SubnetResult(samples=0, loss_sum=0.0, correct=None, steps=0))
                       for s in range(world)]
        dead = set(self.failed)
        extra = {
            "topology": "ps",
            "compress": self.compress or "none",
            "bytes_sent": [None if s in dead and s not in results else traffic[s].sent for s in range(world)],
            "bytes_received": [None if s in dead and s not in results else traffic[s].received
                               for s in range(world)],
            "failed": {int(s): r for s, r in sorted(failed_now.items())},
            "excluded": sorted(int(s) for s in dead),
            "missing": list(report.missing),
            "rss_mb": [memory.get(s, (None, None))[0] for s in range(world)],
            "rss_peak_mb": [memory.get(s, (None, None))[1] for s in range(world)],
            **self._comparison(all_results),
        }
        return RoundResult(round=round, results=all_results, report=report, parameters_per_subnet=parameters,
                           bytes_per_subnet=sizes, seconds=time.perf_counter() - start, extra=extra)

    def _ps_write_back(self, round: int, slot: int, subnet: nn.Module, update: torch.Tensor) -> None:
        """Write a worker's update (values, or quantized deltas) into rank 0's copy of its subnet."""
        names = self._slot_names(round, slot)
        values = comm.unpack(update, self._slot_specs(round, slot), self.compress)
        state = _state(subnet)
        with torch.no_grad():
            for name, value in zip(names, values):
                target = state[name]
                value = value.to(target.device)
                if self.compress is not None and target.is_floating_point():
                    target.add_(value.to(target.dtype))
                else:
                    target.copy_(value.to(target.dtype))

    def _ps_worker_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        start = time.perf_counter()
        slot = self.rank
        parameters, sizes = self._slot_sizes(round)
        if self.active:
            header = torch.zeros(2, dtype=torch.int64, device=self.comm_device)
            dist.recv(header, 0, tag=_tag(round, _KIND_HEADER))
            if int(header[0]) == _STOP:
                self.active = False
        if not self.active:
            report = ReassembleReport(round, missing=[slot])
            return RoundResult(round, [SubnetResult(0, 0.0, None, 0)], report, parameters, sizes,
                               time.perf_counter() - start, {"excluded": [slot]})
        names = self._slot_names(round, slot)
        specs = self._slot_specs(round, slot)
        payload = torch.empty(comm.packed_nbytes(specs, self.compress), dtype=torch.uint8, device=self.comm_device)
        dist.recv(payload, 0, tag=_tag(round, _KIND_PAYLOAD))
        received = comm.tensor_nbytes(header) + payload.numel()
        values = comm.unpack(payload, specs, self.compress)
        del payload
        tensors = {n: v.to(self.device) for n, v in zip(names, values)}
        base = ({n: v.clone() for n, v in tensors.items() if v.is_floating_point()}
                if self.compress is not None else {})
        subnet = self._instantiate(round, slot, tensors)
        result = train_subnet(slot, subnet)
        self._faults.strike(round, subnet)
        state = _state(subnet)
        with torch.no_grad():
            out = [state[n].detach() - base[n].to(state[n].device) if n in base else state[n].detach()
                   for n in names]
            update = comm.pack(out, self.compress, device=self.comm_device)
        del out
        rss, peak = rss_mb(), peak_rss_mb()
        head = torch.tensor(
            [round, result.samples, result.loss_sum, -1 if result.correct is None else result.correct,
             result.steps, -1 if rss is None else rss, -1 if peak is None else peak,
             time.perf_counter() - start, received, 0.0],
            dtype=torch.float64, device=self.comm_device,
        )
        works = [dist.isend(head, 0, tag=_tag(round, _KIND_RESULT)),
                 dist.isend(update, 0, tag=_tag(round, _KIND_UPDATE))]
        for work in works:
            work.wait()
        self.store.set(self._done_key(round, slot), b"1")
        report = ReassembleReport(round, accepted=[slot])
        results = [SubnetResult(0, 0.0, None, 0) for _ in range(self.world_size)]
        results[slot] = result
        extra = {"bytes_sent": head.numel() * 8 + update.numel(), "bytes_received": received}
        return RoundResult(round, results, report, parameters, sizes, time.perf_counter() - start, extra)

    # ==================================================================================
    # sharded
    # ==================================================================================
    def _sh_prepare(self, ist: ISTModel, start_round: int, checkpoint: ckpt.Checkpoint | None) -> None:
        plan = ist.plan
        if not plan.policy.disjoint or plan.blocks:
            raise ISTError(
                "the sharded topology moves every unit to exactly one next trainer: it needs a disjoint "
                "width-only plan (policy 'disjoint' or 'rolling', no blocks=). Use topology='ps' for "
                f"policy {type(plan.policy).__name__}{' with blocks' if plan.blocks else ''}."
            )
        slices = ist.slices(start_round)
        self.cut = [n for n in self.trainable if slices.is_cut(n)]
        self.shared_names = [n for n in self.trainable if not slices.is_cut(n)]
        self.cut_dims = {n: [d for d, i in enumerate(slices.indices[0][n]) if i is not None] for n in self.cut}
        self.homed: list[str] = []
        for name in self.cut:
            dims = self.cut_dims[name]
            covered = len(dims) == 1 and sum(len(slices.indices[s][name][dims[0]]) for s in range(plan.subnets)) \
                == self.shapes[name][dims[0]]
            if not covered:
                self.homed.append(name)
        self.home_rows: dict[str, tuple[int, int]] = {}
        self.home_bounds: dict[str, torch.Tensor] = {}
        for name in self.homed:
            rows = self.shapes[name][0]
            sizes = [rows // self.world_size + (1 if r < rows % self.world_size else 0) for r in range(self.world_size)]
            bounds = torch.tensor([0, *sizes]).cumsum(0)
            self.home_bounds[name] = bounds
            self.home_rows[name] = (int(bounds[self.rank]), int(bounds[self.rank + 1]))
        self.held: dict[str, torch.Tensor] = {}
        self.home: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}
        self.held_for: int | None = None
        if checkpoint is not None and checkpoint.format == ckpt.SHARDED:
            self._sh_load_shards(checkpoint, start_round)
        else:
            if checkpoint is not None:
                source = _FileSource(ckpt.model_file(checkpoint.path))
            elif self.init_from is not None:
                source = _FileSource(self.init_from)
            elif _released(ist):
                raise ISTError("the model was built on the meta device: pass init_from (or a checkpoint).")
            else:
                source = _ModelSource(ist)
            self._sh_take(source, start_round)
        release_model(ist)
        self.gathered = False

    def _sh_take(self, source, round: int) -> None:
        """Start-up: read this rank's slices of `round`, its home rows and the shared tensors."""
        slices, _ = self._round(round)
        device = self.comm_device
        with torch.no_grad():
            for name in self.cut:
                index = slices.indices[self.rank][name]
                shape = self.shapes[name]
                rows = index[0] if index[0] is not None else torch.arange(shape[0])
                held = torch.empty(self._slice_shape(slices, name, self.rank), dtype=self.dtypes[name], device=device)
                row_bytes = max(1, math.prod(shape[1:]) * held.element_size())
                step = max(1, _READ_CHUNK // row_bytes)  # full-width rows are read a few at a time
                for k in range(0, len(rows), step):
                    block = source.rows(name, rows[k:k + step])
                    held[k:k + step] = _select(block, [None, *index[1:]]).to(device)
                    del block
                self.held[name] = held
            for name in self.homed:
                start, stop = self.home_rows[name]
                self.home[name] = source.rows(name, torch.arange(start, stop)).to(device)
            for name in self.shared_names:
                self.shared[name] = source.rows(name, None).to(device)
        self.held_for = round

    def _sh_load_shards(self, checkpoint: ckpt.Checkpoint, start_round: int) -> None:
        if checkpoint.world_size != self.world_size:
            raise ISTError(
                f"sharded checkpoint {checkpoint.path} has {checkpoint.world_size} ranks, this run "
                f"{self.world_size}: resume with as many ranks or consolidate it (istfx.runtime.checkpoint.consolidate)."
            )
        loaded = checkpoint.rank_state(self.rank)
        if loaded is None:
            raise ISTError(f"sharded checkpoint {checkpoint.path} lacks the file of rank {self.rank}.")
        meta, tensors = loaded
        if int(meta["held_round"]) != start_round - 1:
            raise ISTError(f"rank file of {checkpoint.path} holds round {meta['held_round']}, "
                           f"expected {start_round - 1}.")
        device = self.comm_device
        self.held = {n: tensors[f"held/{n}"].to(device) for n in self.cut}
        self.home = {n: tensors[f"home/{n}"].to(device) for n in self.homed}
        self.held_for = start_round - 1
        # Shared tensors live in rank 0's file; rank 0 broadcasts them.
        specs = [comm.Spec(self.shapes[n], self.dtypes[n]) for n in self.shared_names]
        if self.rank == 0:
            buffer = comm.pack([tensors[f"shared/{n}"] for n in self.shared_names], None, device=device)
        else:
            buffer = torch.empty(comm.packed_nbytes(specs), dtype=torch.uint8, device=device)
        if specs:
            dist.broadcast(buffer, 0)
        self.shared = dict(zip(self.shared_names, comm.unpack(buffer, specs)))

    # -- the exchange ----------------------------------------------------------------------
    def _owners(self, slices: RoundSlices, name: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per cut dim: (slot holding each index or -1, position of the index in its slot's slice)."""
        out = {}
        for d in self.cut_dims[name]:
            owner = torch.full((self.shapes[name][d],), -1, dtype=torch.long)
            position = torch.full((self.shapes[name][d],), -1, dtype=torch.long)
            for s in range(self.world_size):
                index = slices.indices[s][name][d]
                owner[index] = s
                position[index] = torch.arange(len(index))
            out[d] = (owner, position)
        return out

    def _idle(self, name: str, owners, index: list[torch.Tensor | None]) -> torch.Tensor:
        """True where no slot holds the element of the block `index` selects (bool, broadcastable).

        An element is held when the slot of every cut coordinate is the same
        slot; bool operations keep this at one byte per element.
        """
        ndim = len(self.shapes[name])
        first = None
        idle = None
        for d in self.cut_dims[name]:
            shape = [1] * ndim
            shape[d] = -1
            value = owners[d][0][index[d]].view(shape)
            if first is None:
                first, idle = value, value == -1
            else:
                idle = idle | (value != first)
        return idle

    def _rows_in_home(self, name: str, rows_global: torch.Tensor, home: int) -> torch.Tensor:
        bounds = self.home_bounds[name]
        return torch.nonzero((rows_global >= bounds[home]) & (rows_global < bounds[home + 1])).flatten()

    def _pieces(self, name, sp, sn, own_p, own_n, sender: int, receiver: int) -> list[tuple]:
        """What `sender` sends `receiver` for tensor `name` between the rounds of `sp` and `sn`.

        Each piece is ``(kind, shape, data)``:
        ``"move"``: units trained by `sender` that `receiver` trains next (a block);
        ``"park"``: elements `sender` trained that nobody trains next, to their home `receiver`;
        ``"fetch"``: idle elements homed at `sender` that `receiver` trains next.
        Both sides compute the same pieces in the same order.
        """
        shape = self.shapes[name]
        dims = self.cut_dims[name]
        pieces = []
        src = sp.indices[sender][name]
        dst = sn.indices[receiver][name]
        src_pos, dst_pos = [None] * len(shape), [None] * len(shape)
        empty = False
        for d in dims:
            mask = own_n[d][0][src[d]] == receiver
            pos = torch.nonzero(mask).flatten()
            if pos.numel() == 0:
                empty = True
                break
            src_pos[d] = pos
            dst_pos[d] = own_n[d][1][src[d][pos]]
        if not empty:
            block = tuple(shape[d] if src_pos[d] is None else len(src_pos[d]) for d in range(len(shape)))
            pieces.append(("move", block, (src_pos, dst_pos)))
        if name in self.home_rows:
            # park: sender's trained elements idle next round, rows homed at receiver
            piece = self._masked_piece(name, src, own_n, receiver)
            if piece is not None:
                pieces.append(("park", *piece))
            # fetch: receiver's next elements idle last round, rows homed at sender
            piece = self._masked_piece(name, dst, own_p, sender)
            if piece is not None:
                pieces.append(("fetch", *piece))
        return pieces

    def _masked_piece(self, name: str, index: list, owners, home: int):
        """Elements of the slice `index` idle under `owners` whose rows live at `home`: (shape, data)."""
        shape = self.shapes[name]
        rows = index[0] if index[0] is not None else torch.arange(shape[0])
        row_sel = self._rows_in_home(name, rows, home)
        if row_sel.numel() == 0:
            return None
        block = [index[0][row_sel] if index[0] is not None else row_sel, *index[1:]]
        mask = self._idle(name, owners, block)
        full = (len(row_sel), *[shape[d] if index[d] is None else len(index[d]) for d in range(1, len(shape))])
        count = int(mask.expand(full).sum())
        if not count:
            return None
        return (count,), (row_sel, mask, block, full)

    def _take_piece(self, name: str, piece: tuple) -> torch.Tensor:
        kind, _, data = piece
        if kind == "move":
            src_pos, _ = data
            return _take_block(self.held[name], src_pos)
        row_sel, mask, block, full = data
        if kind == "park":  # from this rank's trained slice: rows by position in it
            return _masked_take(self.held[name], [row_sel, *[None] * (len(full) - 1)], mask, full)
        start, _ = self.home_rows[name]  # fetch: from this rank's home rows
        return _masked_take(self.home[name], [block[0] - start, *block[1:]], mask, full)

    def _put_piece(self, name: str, piece: tuple, value: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        kind, shape, data = piece
        if kind == "move":
            _, dst_pos = data
            _put_block(new[name], dst_pos, value.reshape(shape))
            return
        row_sel, mask, block, full = data
        if kind == "park":  # into this rank's home rows
            start, _ = self.home_rows[name]
            _masked_put(self.home[name], [block[0] - start, *block[1:]], mask, full, value)
            return
        _masked_put(new[name], [row_sel, *[None] * (len(full) - 1)], mask, full, value)  # fetch

    def _sh_exchange(self, previous: int, round: int, traffic: comm.Traffic) -> None:
        """Move every unit from its trainer of `previous` to its trainer of `round` (one all-to-all).

        Pieces are written straight into one send buffer and the old slices
        are dropped before the new ones are allocated, so besides its homes a
        rank holds at most the old or new slices, the two buffers and the
        part of its units it keeps.
        """
        sp, _ = self._round(previous)
        sn, _ = self._round(round)
        me, world = self.rank, self.world_size
        device = self.comm_device
        compress = self.compress
        outgoing: list[list[tuple[str, tuple]]] = [[] for _ in range(world)]
        incoming: list[list[tuple[str, tuple]]] = [[] for _ in range(world)]
        staying: list[tuple[str, tuple, torch.Tensor]] = []  # pieces this rank keeps (or parks at home)
        with torch.no_grad():
            for name in self.cut:
                own_p, own_n = self._owners(sp, name), self._owners(sn, name)
                for k in range(world):
                    pieces = self._pieces(name, sp, sn, own_p, own_n, me, k)
                    if k == me:
                        staying.extend((name, piece, self._take_piece(name, piece)) for piece in pieces)
                    else:
                        outgoing[k].extend((name, piece) for piece in pieces)
                for j in range(world):
                    if j != me:
                        incoming[j].extend((name, p) for p in self._pieces(name, sp, sn, own_p, own_n, j, me))

            def nbytes(entry: tuple[str, tuple]) -> int:
                name, piece = entry
                return comm.packed_nbytes([comm.Spec(tuple(piece[1]), self.dtypes[name])], compress)

            send_sizes = [sum(nbytes(e) for e in outgoing[k]) for k in range(world)]
            recv_sizes = [sum(nbytes(e) for e in incoming[j]) for j in range(world)]
            send = torch.empty(sum(send_sizes), dtype=torch.uint8, device=device)
            offset = 0
            last_use = {}
            for k in range(world):
                for position, (name, _) in enumerate(outgoing[k]):
                    last_use[name] = (k, position)
            for k in range(world):
                for position, (name, piece) in enumerate(outgoing[k]):
                    offset += comm.pack_into(send[offset:], [self._take_piece(name, piece)], compress)
                    if last_use.get(name) == (k, position):
                        self.held.pop(name, None)  # every piece of the old slice is out
            self.held.clear()
            new = {n: torch.empty(self._slice_shape(sn, n, me), dtype=self.dtypes[n], device=device)
                   for n in self.cut}
            for name, piece, value in staying:
                self._put_piece(name, piece, value, new)
            del staying
            output = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
            dist.all_to_all_single(output, send, recv_sizes, send_sizes)
            del send
            traffic.add(sent=sum(send_sizes), received=sum(recv_sizes))
            offset = 0
            for j in range(world):
                for name, piece in incoming[j]:
                    size = nbytes((name, piece))
                    spec = comm.Spec(tuple(piece[1]), self.dtypes[name])
                    value = comm.unpack(output[offset:offset + size], [spec], compress)[0]
                    self._put_piece(name, piece, value, new)
                    offset += size
        self.held = new
        self.held_for = round

    def _sh_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        try:
            return self._sh_round_unguarded(ist, round, train_subnet)
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, ISTError) or not _is_comm_error(exc):
                raise
            raise ISTError(
                f"round {round}: a rank of the sharded job failed ({str(exc).splitlines()[0][:200]}). Each unit "
                "lives on one rank only, so the job cannot go on without it: restart it with --resume "
                "(fit(..., resume=True)) from the last checkpoint, or use topology='ps', which continues "
                "without failed workers."
            ) from exc

    def _sh_round_unguarded(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        start = time.perf_counter()
        me, world = self.rank, self.world_size
        traffic = comm.Traffic()
        if self.held_for is None:
            raise ISTError("the sharded backend holds no state: call prepare first.")
        if self.held_for == round - 1:
            self._sh_exchange(round - 1, round, traffic)
        elif self.held_for != round:
            raise ISTError(f"the sharded backend holds round {self.held_for}; rounds must follow each other "
                           f"(asked for round {round}).")
        tensors = {n: self.held[n].clone().to(self.device) for n in self.cut}
        tensors.update({n: self.shared[n].clone().to(self.device) for n in self.shared_names})
        names = set(self._slot_names(round, me))
        subnet = self._instantiate(round, me, {n: v for n, v in tensors.items() if n in names})
        del tensors
        result = train_subnet(me, subnet)
        self._faults.strike(round, subnet)
        state = _state(subnet)
        ok = all(_finite(state[n]) for n in names)
        rss, peak = rss_mb(), peak_rss_mb()
        mine = torch.tensor(
            [float(ok), result.samples, result.loss_sum, -1 if result.correct is None else result.correct,
             result.steps, traffic.sent, traffic.received, -1 if rss is None else rss,
             -1 if peak is None else peak, self._sh_state_bytes()],
            dtype=torch.float64, device=self.comm_device,
        )
        stats = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(stats, mine)
        stats = [s.cpu().tolist() for s in stats]
        gather_bytes = comm.tensor_nbytes(mine) * (world - 1)
        accepted = [s for s in range(world) if stats[s][0] > 0]
        weights = {s: max(stats[s][1], 1.0) for s in accepted}
        with torch.no_grad():
            if ok:
                for name in self.cut:
                    self.held[name] = state[name].detach().to(self.comm_device)
            shared_bytes = self._sh_average_shared(state, ok, weights.get(me, 0.0), sum(weights.values()))
        del subnet, state
        traffic.add(sent=comm.ring_allreduce_bytes(shared_bytes, world) + gather_bytes,
                    received=comm.ring_allreduce_bytes(shared_bytes, world) + gather_bytes)
        results = [
            SubnetResult(samples=int(v[1]), loss_sum=v[2], correct=None if v[3] < 0 else int(v[3]), steps=int(v[4]))
            for v in stats
        ]
        rejected = {s: "non-finite values in its update" for s in range(world) if s not in accepted}
        for s in rejected:
            if me == 0:
                warnings.warn(f"istfx: subnet {s} of round {round} rejected: non-finite values", RuntimeWarning,
                              stacklevel=2)
        report = ReassembleReport(round, accepted=accepted, rejected=rejected)
        parameters, sizes = self._slot_sizes(round)
        # All ranks saw the same stats: every rank's traffic (exchange measured, all-reduce estimated).
        allreduce = comm.ring_allreduce_bytes(shared_bytes, world) + gather_bytes
        extra = {
            "topology": "sharded",
            "compress": self.compress or "none",
            "bytes_sent": [int(v[5] + allreduce) for v in stats],
            "bytes_received": [int(v[6] + allreduce) for v in stats],
            "exchange_bytes_sent": [int(v[5]) for v in stats],
            "exchange_bytes_received": [int(v[6]) for v in stats],
            "shared_allreduce_bytes": int(shared_bytes),
            "failed": {},
            "rss_mb": [v[7] if v[7] >= 0 else None for v in stats],
            "rss_peak_mb": [v[8] if v[8] >= 0 else None for v in stats],
            "state_bytes": [int(v[9]) for v in stats],
            **self._comparison(results),
        }
        return RoundResult(round=round, results=results, report=report, parameters_per_subnet=parameters,
                           bytes_per_subnet=sizes, seconds=time.perf_counter() - start, extra=extra)

    def _sh_state_bytes(self) -> int:
        """Bytes this rank keeps between rounds: its slices, its homes and the shared tensors."""
        return sum(comm.tensor_nbytes(t) for part in (self.held, self.home, self.shared) for t in part.values())

    def _sh_average_shared(self, state: dict[str, torch.Tensor], ok: bool, weight: float, total: float) -> int:
        """All-reduce the shared tensors: sample-weighted mean of floats, maximum of integers."""
        floats = [n for n in self.shared_names if self.dtypes[n].is_floating_point]
        others = [n for n in self.shared_names if not self.dtypes[n].is_floating_point]
        size = 0
        device = self.comm_device
        if floats and total > 0:
            parts = []
            for n in floats:
                old = self.shared[n].to(device).double().reshape(-1)
                parts.append((state[n].detach().to(device).double().reshape(-1) - old) * weight if ok
                             else torch.zeros_like(old))
            buffer = torch.cat(parts)
            dist.all_reduce(buffer)
            size += comm.tensor_nbytes(buffer)
            offset = 0
            for n in floats:
                old = self.shared[n]
                count = old.numel()
                delta = buffer[offset:offset + count].view(old.shape)
                offset += count
                self.shared[n] = (old.double() + delta / total).to(self.dtypes[n])
        if others and total > 0:
            low = torch.iinfo(torch.int64).min
            parts = [state[n].detach().to(device).to(torch.int64).reshape(-1) if ok
                     else torch.full((self.shared[n].numel(),), low, dtype=torch.int64, device=device)
                     for n in others]
            buffer = torch.cat(parts)
            dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
            size += comm.tensor_nbytes(buffer)
            offset = 0
            for n in others:
                count = self.shared[n].numel()
                self.shared[n] = buffer[offset:offset + count].view(self.shared[n].shape).to(self.dtypes[n])
                offset += count
        return size

    # -- gathering ---------------------------------------------------------------------------
    def _sh_gather(self, ist: ISTModel) -> None:
        """Assemble the full model in rank 0's ``ist.model`` (every rank calls this).

        Rank 0 takes one rank's part at a time and writes it in before the
        next arrives, so it holds the full model plus one part, never all
        parts at once. Homes go first: they hold stale copies of elements
        that a slice holds fresh, and the slices are written over them.
        """
        device = self.comm_device
        held_round = self.held_for
        slices, _ = self._round(held_round)
        if self.rank != 0:
            if self.homed:
                dist.send(comm.pack([self.home[n] for n in self.homed], None, device=device), 0,
                          tag=_tag(held_round, _KIND_GATHER_HOME))
            dist.send(comm.pack([self.held[n] for n in self.cut], None, device=device), 0,
                      tag=_tag(held_round, _KIND_GATHER))
            return
        materialize_model(ist)
        with torch.no_grad():
            for j in range(self.world_size if self.homed else 0):
                if j == 0:
                    homes = [self.home[n] for n in self.homed]
                else:
                    specs = [comm.Spec((int(self.home_bounds[n][j + 1] - self.home_bounds[n][j]),
                                        *self.shapes[n][1:]), self.dtypes[n]) for n in self.homed]
                    buffer = torch.empty(comm.packed_nbytes(specs), dtype=torch.uint8, device=device)
                    dist.recv(buffer, j, tag=_tag(held_round, _KIND_GATHER_HOME))
                    homes = comm.unpack(buffer, specs)
                for name, part in zip(self.homed, homes):
                    bounds = self.home_bounds[name]
                    ist.state_tensor(name)[int(bounds[j]):int(bounds[j + 1])].copy_(part)
                del homes
            for j in range(self.world_size):
                if j == 0:
                    held = [self.held[n] for n in self.cut]
                else:
                    specs = [comm.Spec(self._slice_shape(slices, n, j), self.dtypes[n]) for n in self.cut]
                    buffer = torch.empty(comm.packed_nbytes(specs), dtype=torch.uint8, device=device)
                    dist.recv(buffer, j, tag=_tag(held_round, _KIND_GATHER))
                    held = comm.unpack(buffer, specs)
                for name, part in zip(self.cut, held):
                    full = ist.state_tensor(name)
                    slices.put(name, full, [(j, part.to(full.device), 1.0)])
                del held
            for name in self.shared_names:
                ist.state_tensor(name).copy_(self.shared[name])
        self.gathered = True

    @contextlib.contextmanager
    def full_model(self, ist: ISTModel) -> Iterator[nn.Module | None]:
        """The full model on rank 0 (None on the others), for evaluation. Every rank must enter it.

        ``ps``: rank 0's model. ``sharded``: gathered onto rank 0 for the
        duration of the block, then dropped again.
        """
        if self.topology == "ps":
            yield ist.model if self.rank == 0 else None
            return
        self._sh_gather(ist)
        try:
            yield ist.model if self.rank == 0 else None
        finally:
            if self.rank == 0:
                release_model(ist)
                self.gathered = False

    def finish(self, ist: ISTModel) -> None:
        """End of training: leave the trained model in rank 0's ``ist.model`` (sharded: gathered)."""
        if self.topology == "sharded" and self._prepared:
            self._sh_gather(ist)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, ist: ISTModel, root: str | os.PathLike, round: int, rank_state: dict,
                        manifest: dict, keep: int | None = None) -> None:
        """Write the checkpoint of `round` (every rank calls this after the round).

        ``ps``: rank 0 writes the full model; every rank its RNG state and
        data position. ``sharded``: every rank writes its slices (with their
        indices), its home rows and, on rank 0, the shared tensors, without
        gathering. Rank 0 writes the manifest once all files exist.
        """
        directory = ckpt.round_dir(root, round)
        meta = dict(rank_state)
        tensors: dict[str, torch.Tensor] = {}
        if self.topology == "sharded":
            slices, _ = self._round(self.held_for)
            meta.update({
                "held_round": self.held_for,
                "held": list(self.cut),
                "shapes": {n: list(self.shapes[n]) for n in self.trainable},
                "dtypes": {n: str(self.dtypes[n]).replace("torch.", "") for n in self.trainable},
                "home_rows": {n: list(self.home_rows[n]) for n in self.homed},
            })
            for name in self.cut:
                tensors[f"held/{name}"] = self.held[name]
                for d, index in enumerate(slices.indices[self.rank][name]):
                    if index is not None:
                        tensors[f"index/{name}/{d}"] = index
            for name in self.homed:
                tensors[f"home/{name}"] = self.home[name]
            if self.rank == 0:
                for name in self.shared_names:
                    tensors[f"shared/{name}"] = self.shared[name]
            ckpt.save_rank(directory, self.rank, meta, tensors)
            dist.barrier()
            if self.rank == 0:
                ckpt.write_manifest(root, round, {**manifest, "format": ckpt.SHARDED,
                                                  "world_size": self.world_size}, keep)
            dist.barrier()
            return
        key = f"ckpt/{round}/{self.rank}"
        if self.rank != 0:
            if self.active:
                ckpt.save_rank(directory, self.rank, meta)
                self.store.set(key, b"1")
            return
        ckpt.save_full(ist, directory, round)
        ckpt.save_rank(directory, 0, meta)
        waiting = {s for s in range(1, self.world_size) if s not in self.failed}
        deadline = time.perf_counter() + self.round_timeout
        while waiting and time.perf_counter() < deadline:
            for s in sorted(waiting):
                if self.store.check([f"ckpt/{round}/{s}"]):
                    waiting.discard(s)
            if waiting:
                time.sleep(0.005)
        ckpt.write_manifest(root, round, {
            **manifest, "format": ckpt.FULL, "world_size": self.world_size,
            "missing_rank_files": sorted({*waiting, *self.failed}),
            "excluded": {int(k): v for k, v in sorted(self.failed.items())},
        }, keep)

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        if self._heartbeat is not None:
            self._heartbeat.stop.set()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
