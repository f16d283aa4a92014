"""The sharded topology on torch.distributed: no rank holds the full model after start-up.

Each rank keeps the slices it trained last; one ``all_to_all_single`` per
round moves every unit to its next trainer; shared (uncut) parameters are
kept on every rank and averaged with one all-reduce (weighted by samples).
Elements that no subnet trains in a round (the off-diagonal blocks of a
tensor cut along two split axes, units left out by ``sizes``) are parked at a
fixed *home* rank (a contiguous block of rows) and fetched from there, in the
same all-to-all, when a subnet needs them again. A rank holds its slice, its
share of the homes and the shared tensors: about 1/S of the split parameters
(1/S + 1/S^2 of a tensor cut along two axes).
:meth:`TorchShardedBackend.full_model` gathers the model on rank 0 only when
asked (evaluation). Checkpoints and :meth:`TorchShardedBackend.save_model`
never gather: each rank moves its units to their canonical rows (one
all-to-all per tensor; the homes already are those rows) and writes them with
torch.distributed.checkpoint (:mod:`istfx.runtime.dcp_checkpoint`), with the
optimizer state and outer momentum they carry; a resume reads the canonical
rows under its own world size and deals them out again, so it may run on
another number of subnets.

With ``fit(optimizer_state="carry")`` a unit's optimizer state lives with
it: each rank keeps the state of its slices, every state key (and, with the
outer step, the outer momentum) is moved by the same exchange as the values,
idle elements' state parks at their home rows, and the shared tensors' state
is averaged like the tensors; no rank ever holds the full state. The outer
step is taken by the rank holding a slice, after its training.

Needs a disjoint width-only plan (no ``overlap``, no dealt-out blocks); a
dead rank takes the only copy of its units with it, so this topology stops
with an error on a fault and is resumed from its last checkpoint.

Usage, inside a script started by ``torchrun --nproc-per-node 4``::

    backend = TorchShardedBackend()       # or TorchDistBackend("sharded")
    history = istfx.fit(ist, per_subnet_data, rounds=50, local_steps=10, backend=backend)

Every round's ``RoundResult.extra`` reports, per rank, ``bytes_sent`` and
``bytes_received`` (the all-to-all as measured plus the shared all-reduce and
the metrics gather at ring cost), ``exchange_bytes_sent`` and
``exchange_bytes_received`` (the all-to-all alone), ``state_bytes`` (what
the rank keeps between rounds) and each rank's resident memory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from istfx.core.compiler import ISTModel, ReassembleReport, all_finite
from istfx.core.slicing import RoundSlices
from istfx.errors import ISTError
from istfx.runtime import checkpoint as ckpt
from istfx.runtime import comm
from istfx.runtime import dcp_checkpoint as dcp_ckpt
from istfx.runtime.backend_api import RoundResult, SubnetResult, TrainSubnet
from istfx.runtime.launch import LAUNCHER_PID_ENV
from istfx.runtime.optim_state import attach
from istfx.runtime.outer import MOMENTUM_KEY
from istfx.runtime.state_travel import StateConfig, outer_names

from .memory import peak_rss_mb, rss_mb
from .model_storage import is_released, materialize_model, release_model, state_of
from .row_slicing import masked_put, masked_take, put_block, select, take_block
from .torch_base import TorchDistBackend, is_comm_error, message_tag, rendezvous_store

__all__ = ["TorchShardedBackend"]

_KIND_GATHER, _KIND_GATHER_HOME = 4, 5  # message kinds of the gather (ps uses 0-3)
_READ_CHUNK = 32 * 2 ** 20  # bytes of full-width rows read at once at start-up


# -- where a rank's start-up rows come from ----------------------------------------------------------
class _FileSource:
    """Rows of tensors in a safetensors file, read without loading (or mapping) the rest."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = ckpt.TensorFile(path)

    def rows(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        return self.file.rows(name, rows)


class _ModelSource:
    """Rows of the tensors of ``ist.model`` as built on this rank."""

    def __init__(self, ist: ISTModel) -> None:
        self.ist = ist

    def rows(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        full = self.ist.state_tensor(name).detach()
        return full.clone() if rows is None else full.index_select(0, rows)


# -- the backend ---------------------------------------------------------------------------------------
class TorchShardedBackend(TorchDistBackend):
    """IST rounds where every rank keeps only its own slices (see the module docstring).

    Args:
        topology: ``"sharded"`` (what ``TorchDistBackend("sharded", ...)`` passes on).
        compress: ``None``, ``"int8"`` or ``"int4"``: units moving to another
            rank are quantized (units that stay on their rank and the shared
            all-reduce are exact).
        timeout: the process group's timeout (collectives and blocking receives).
        init_from: a safetensors file with the initial model state; ranks read
            only the rows they need and never materialise the full model.
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available).
        heartbeat_timeout: a rank whose heartbeat stops this long is hung: the
            job stops (every rank exits, resumable from the last checkpoint)
            instead of waiting up to `timeout` in a collective. Under ``istfx
            train`` the launcher watches the ranks; under torchrun they watch
            each other through the store (:meth:`watch_peers`). None: off.
        round_timeout: accepted so that one ``TorchDistBackend(topology, ...)``
            call serves both topologies; unused here (a failed rank stops the job).
    """

    topology = "sharded"

    def __init__(
        self,
        topology: str = "sharded",
        *,
        compress: str | None = None,
        timeout: float = 1800.0,
        init_from: str | os.PathLike | None = None,
        backend: str | None = None,
        round_timeout: float | None = None,
        heartbeat_timeout: float | None = None,
    ) -> None:
        self._check_topology(topology)
        super().__init__(compress=compress, timeout=timeout, init_from=init_from, backend=backend)
        self.heartbeat_timeout = None if not heartbeat_timeout else float(heartbeat_timeout)
        self.held_for: int | None = None
        self.gathered = False
        self._reset_state()

    def configure_state(self, config: StateConfig) -> None:
        """Carry optimizer state / take the outer step. The state of a unit lives with it: each rank keeps
        the state (and outer momentum) of the slices it holds, and the exchange moves it with the units;
        idle elements' state parks at their home rows like their values. No rank holds the full state."""
        self.state_config = config
        self._reset_state()

    def _reset_state(self) -> None:
        # key -> name -> tensor shaped like this rank's slice (optimizer state; MOMENTUM_KEY: outer momentum)
        self.state_held: dict[str, dict[str, torch.Tensor]] = {}
        self.state_home: dict[str, dict[str, torch.Tensor]] = {}  # key -> name -> home rows
        self.shared_state: dict[str, dict[str, torch.Tensor]] = {}  # shared name -> key -> tensor (every rank)
        self.shared_outer: dict[str, torch.Tensor] = {}  # shared name -> outer momentum (every rank)
        self.scalars: dict[str, dict] = {}  # name -> key -> scalar state (Adam's step), the same on every rank

    # -- set-up -----------------------------------------------------------------------------------
    def load_state(self, ist: ISTModel, start_round: int, checkpoint: ckpt.Checkpoint | None) -> None:
        """Take this rank's slices of `start_round`, its home rows and the shared tensors; drop the model."""
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
        for name in self.homed:  # homes are the canonical rows of a DCP checkpoint: saving writes them in place
            rows = self.shapes[name][0]
            bounds = torch.tensor([0, *[dcp_ckpt.row_range(rows, self.world_size, r)[1]
                                        for r in range(self.world_size)]])
            self.home_bounds[name] = bounds
            self.home_rows[name] = (int(bounds[self.rank]), int(bounds[self.rank + 1]))
        self.held: dict[str, torch.Tensor] = {}
        self.home: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}
        self.held_for: int | None = None
        if checkpoint is not None and checkpoint.format == dcp_ckpt.FORMAT:
            self._load_dcp(checkpoint, start_round)
        elif checkpoint is not None and checkpoint.format == ckpt.SHARDED:
            self._load_shards(checkpoint, start_round)
        else:
            if checkpoint is not None:
                source = _FileSource(ckpt.model_file(checkpoint.path))
            elif self.init_from is not None:
                source = _FileSource(self.init_from)
            elif is_released(ist):
                raise ISTError("the model was built on the meta device: pass init_from (or a checkpoint).")
            else:
                source = _ModelSource(ist)
            self._take(source, start_round)
        release_model(ist)
        self.gathered = False
        self.watch_peers()

    def _take(self, source, round: int) -> None:
        """Start-up: read this rank's slices of `round`, its home rows and the shared tensors."""
        slices, _ = self.round_slices(round)
        device = self.comm_device
        with torch.no_grad():
            for name in self.cut:
                index = slices.indices[self.rank][name]
                shape = self.shapes[name]
                rows = index[0] if index[0] is not None else torch.arange(shape[0])
                held = torch.empty(self.slice_shape(slices, name, self.rank), dtype=self.dtypes[name], device=device)
                row_bytes = max(1, math.prod(shape[1:]) * held.element_size())
                step = max(1, _READ_CHUNK // row_bytes)  # full-width rows are read a few at a time
                for k in range(0, len(rows), step):
                    block = source.rows(name, rows[k:k + step])
                    held[k:k + step] = select(block, [None, *index[1:]]).to(device)
                    del block
                self.held[name] = held
            for name in self.homed:
                start, stop = self.home_rows[name]
                self.home[name] = source.rows(name, torch.arange(start, stop)).to(device)
            for name in self.shared_names:
                self.shared[name] = source.rows(name, None).to(device)
        self.held_for = round

    def _load_shards(self, checkpoint: ckpt.Checkpoint, start_round: int) -> None:
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

    # -- failure detection (no unit has a second copy: a hung or dead rank stops the job) -------------
    def watch_peers(self) -> None:
        """Under torchrun: beat this rank's heartbeat in the store and end this process when a peer's stops
        for ``heartbeat_timeout`` (or the store stops answering), so torchrun stops the job at once instead
        of every rank waiting in a collective for the process group timeout. Under ``istfx train`` the
        launcher does this for every rank (nothing to do here)."""
        if not self.heartbeat_timeout or self.world_size < 2 or os.environ.get(LAUNCHER_PID_ENV):
            return
        self.start_heartbeat(self.heartbeat_timeout)
        self._watching = True
        threading.Thread(target=self._watch_loop, name="istfx-peer-watch", daemon=True).start()

    def close(self) -> None:
        """Say goodbye to the peers' watch (a rank done with the job is not hung), then leave."""
        if getattr(self, "_watching", False):
            with contextlib.suppress(Exception):
                rendezvous_store(5.0).set(f"bye/{self.rank}", b"1")
        super().close()

    def _watch_loop(self) -> None:
        timeout = self.heartbeat_timeout
        stop = self.heartbeat.stop
        try:
            store = rendezvous_store(timeout)
        except Exception:
            return
        now = time.monotonic()
        seen = {r: ("", now) for r in range(self.world_size) if r != self.rank}
        while not stop.wait(min(1.0, timeout / 10)):
            for peer, (value, when) in list(seen.items()):
                try:
                    if store.check([f"bye/{peer}"]):  # done with the job
                        del seen[peer]
                        continue
                    beat = store.get(f"hb/{peer}").decode() if store.check([f"hb/{peer}"]) else ""
                except Exception as exc:  # rank 0 holds the store: it is hung or gone
                    if stop.is_set():
                        return
                    self._stop_hung(0, f"the store on rank 0 does not answer ({str(exc).splitlines()[0][:80]})")
                now = time.monotonic()
                if beat != value:
                    seen[peer] = (beat, now)
                elif now - when > timeout and not stop.is_set():
                    self._stop_hung(peer, f"no heartbeat for {now - when:.1f}s")

    def _stop_hung(self, peer: int, why: str) -> None:
        print(f"istfx: rank {self.rank}: rank {peer} is hung ({why}); each unit of the sharded job lives on one "
              "rank only, so it cannot go on: stopping. Restart with --resume (fit(..., resume=True)) from the "
              "last checkpoint.", file=sys.stderr, flush=True)
        os._exit(1)

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

    def _take_piece(self, name: str, piece: tuple, held: dict | None = None, home: dict | None = None) -> torch.Tensor:
        held = self.held if held is None else held
        home = self.home if home is None else home
        kind, _, data = piece
        if kind == "move":
            src_pos, _ = data
            return take_block(held[name], src_pos)
        row_sel, mask, block, full = data
        if kind == "park":  # from this rank's trained slice: rows by position in it
            return masked_take(held[name], [row_sel, *[None] * (len(full) - 1)], mask, full)
        start, _ = self.home_rows[name]  # fetch: from this rank's home rows
        return masked_take(home[name], [block[0] - start, *block[1:]], mask, full)

    def _put_piece(self, name: str, piece: tuple, value: torch.Tensor, new: dict[str, torch.Tensor],
                   home: dict | None = None) -> None:
        home = self.home if home is None else home
        kind, shape, data = piece
        if kind == "move":
            _, dst_pos = data
            put_block(new[name], dst_pos, value.reshape(shape))
            return
        row_sel, mask, block, full = data
        if kind == "park":  # into this rank's home rows
            start, _ = self.home_rows[name]
            masked_put(home[name], [block[0] - start, *block[1:]], mask, full, value)
            return
        masked_put(new[name], [row_sel, *[None] * (len(full) - 1)], mask, full, value)  # fetch

    def _exchange(self, previous: int, round: int, traffic: comm.Traffic) -> None:
        """Move every unit, and the optimizer state and outer momentum it carries, to its next trainer."""
        self.held = self._exchange_channel(previous, round, traffic, self.held, self.home)
        for key in sorted(self.state_held):
            home = self.state_home.setdefault(key, {})
            for name in self.homed:  # state of elements never trained yet: zeros, as a fresh optimizer's
                if name not in home:
                    home[name] = torch.zeros_like(self.home[name])
            self.state_held[key] = self._exchange_channel(previous, round, traffic, self.state_held[key], home)
        self.held_for = round

    def _exchange_channel(self, previous: int, round: int, traffic: comm.Traffic, held: dict[str, torch.Tensor],
                          home: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move one channel (the parameters, or one optimizer-state key) of every unit from its trainer of
        `previous` to its trainer of `round` (one all-to-all); returns the new slices.

        Pieces are written straight into one send buffer and the old slices
        are dropped before the new ones are allocated, so besides its homes a
        rank holds at most the old or new slices, the two buffers and the
        part of its units it keeps.
        """
        sp, _ = self.round_slices(previous)
        sn, _ = self.round_slices(round)
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
                        staying.extend((name, piece, self._take_piece(name, piece, held, home)) for piece in pieces)
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
                    offset += comm.pack_into(send[offset:], [self._take_piece(name, piece, held, home)], compress)
                    if last_use.get(name) == (k, position):
                        held.pop(name, None)  # every piece of the old slice is out
            held.clear()
            new = {n: torch.empty(self.slice_shape(sn, n, me), dtype=self.dtypes[n], device=device)
                   for n in self.cut}
            for name, piece, value in staying:
                self._put_piece(name, piece, value, new, home)
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
                    self._put_piece(name, piece, value, new, home)
                    offset += size
        return new

    def train_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        try:
            return self._round_unguarded(ist, round, train_subnet)
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, ISTError) or not is_comm_error(exc):
                raise
            raise ISTError(
                f"round {round}: a rank of the sharded job failed ({str(exc).splitlines()[0][:200]}). Each unit "
                "lives on one rank only, so the job cannot go on without it: restart it with --resume "
                "(fit(..., resume=True)) from the last checkpoint, or use topology='ps', which continues "
                "without failed workers."
            ) from exc

    def _round_unguarded(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        start = time.perf_counter()
        me, world = self.rank, self.world_size
        traffic = comm.Traffic()
        if self.held_for is None:
            raise ISTError("the sharded backend holds no state: call prepare first.")
        if self.held_for == round - 1:
            self._exchange(round - 1, round, traffic)
        elif self.held_for != round:
            raise ISTError(f"the sharded backend holds round {self.held_for}; rounds must follow each other "
                           f"(asked for round {round}).")
        tensors = {n: self.held[n].clone().to(self.device) for n in self.cut}
        tensors.update({n: self.shared[n].clone().to(self.device) for n in self.shared_names})
        names = set(self.slot_names(round, me))
        subnet = self.instantiate(round, me, {n: v for n, v in tensors.items() if n in names})
        del tensors
        attach(subnet, self._carried_state(names))
        old_held, old_shared = dict(self.held), dict(self.shared)
        result = train_subnet(me, subnet)
        self.after_local_training(round, subnet)
        state = state_of(subnet)
        ok = all(all_finite(state[n]) for n in names)
        rss, peak = rss_mb(), peak_rss_mb()
        mine = torch.tensor(
            [float(ok), result.samples, result.loss_sum, -1 if result.correct is None else result.correct,
             result.steps, traffic.sent, traffic.received, -1 if rss is None else rss,
             -1 if peak is None else peak, self._state_bytes()],
            dtype=torch.float64, device=self.comm_device,
        )
        stats = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(stats, mine)
        stats = [s.cpu().tolist() for s in stats]
        gather_bytes = comm.tensor_nbytes(mine) * (world - 1)
        accepted = [s for s in range(world) if stats[s][0] > 0]
        weights = {s: max(stats[s][1], 1.0) for s in accepted}
        outer = self.state_config.outer
        stepped = set(outer_names(ist)) if not outer.identity else set()
        with torch.no_grad():
            if ok:
                for name in self.cut:
                    self.held[name] = state[name].detach().to(self.comm_device)
                if self.state_config.carry and result.optimizer_state:
                    self._keep_state(result.optimizer_state)
                if stepped:
                    momentum = self.state_held.setdefault(MOMENTUM_KEY, {})
                    for name in self.cut:
                        if name in stepped:
                            self.held[name], momentum[name] = outer.update(
                                old_held[name], self.held[name],
                                momentum.get(name, torch.zeros_like(self.held[name])))
                        elif name not in momentum:
                            momentum[name] = torch.zeros_like(self.held[name])
            shared_bytes = self._average_shared(state, ok, weights.get(me, 0.0), sum(weights.values()))
            if self.state_config.carry:
                shared_bytes += self._average_shared_state(result.optimizer_state if ok else None,
                                                           weights.get(me, 0.0), sum(weights.values()))
            for name in self.shared_names:  # every rank takes the same step: the copies stay equal
                if name in stepped and any(weights.values()):
                    self.shared[name], self.shared_outer[name] = outer.update(
                        old_shared[name], self.shared[name], self.shared_outer.get(name))
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
        parameters, sizes = self.slot_sizes(round)
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
        }
        return RoundResult(round=round, results=results, report=report, parameters_per_subnet=parameters,
                           bytes_per_subnet=sizes, seconds=time.perf_counter() - start, extra=extra)

    def _state_bytes(self) -> int:
        """Bytes this rank keeps between rounds: its slices, its homes and the shared tensors, with the
        optimizer state and outer momentum they carry."""
        parts = [self.held, self.home, self.shared, self.shared_outer, *self.state_held.values(),
                 *self.state_home.values(), *self.shared_state.values()]
        return sum(comm.tensor_nbytes(t) for part in parts for t in part.values())

    # -- optimizer state that travels with the units ---------------------------------------------
    def _carried_state(self, names: set[str]) -> dict | None:
        """The optimizer state this rank's subnet starts the round with (None: a fresh optimizer)."""
        if not self.state_config.carry or not (self.state_held or self.shared_state or self.scalars):
            return None
        out = {}
        for name in names:
            entry = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.scalars.get(name, {}).items()}
            if name in self.shared_state:
                entry.update({k: v.clone().to(self.device) for k, v in self.shared_state[name].items()})
            for key, channel in self.state_held.items():
                if key != MOMENTUM_KEY and name in channel:
                    entry[key] = channel[name].clone().to(self.device)
            if any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in entry.values()):
                out[name] = entry  # never a partial entry (Adam's step without its moments)
        return out

    def _keep_state(self, trained: dict) -> None:
        """Keep the trained state of this rank's slices (shaped entries) and the scalars; every cut name gets
        every key (zeros where it has none), so all ranks exchange the same channels."""
        keys: set[str] = set()
        for name, entry in trained.items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if name in self.held and tuple(value.shape) == tuple(self.held[name].shape):
                        keys.add(key)
                        self.state_held.setdefault(key, {})[name] = value.detach().to(
                            self.comm_device, self.held[name].dtype)
                else:
                    self.scalars.setdefault(name, {})[key] = value.clone() if isinstance(value, torch.Tensor) else value
        for key in keys:
            channel = self.state_held[key]
            for name in self.cut:
                if name not in channel:
                    channel[name] = torch.zeros_like(self.held[name])

    def _average_shared_state(self, trained: dict | None, weight: float, total: float) -> int:
        """All-reduce the shared tensors' optimizer state: the sample-weighted mean, as for the tensors."""
        if total <= 0:
            return 0
        device = self.comm_device
        entries = []  # (name, key, shape, dtype) in the same order on every rank
        for name in self.shared_names:
            if self.ist.plan.state_kinds[name] != "parameter" or not self.dtypes[name].is_floating_point:
                continue  # buffers keep no optimizer state (tied parameters appear under each name)
            for key in sorted(self._shared_state_keys(name, trained)):
                entries.append((name, key))
        if not entries:
            return 0
        parts = []
        for name, key in entries:
            old = self.shared_state.get(name, {}).get(key)
            if old is None:
                old = torch.zeros(self.shapes[name], dtype=self.dtypes[name], device=device)
            new = (trained or {}).get(name, {}).get(key)
            parts.append(((new.detach().to(device).double() - old.double()) * weight).reshape(-1)
                         if new is not None else torch.zeros(old.numel(), dtype=torch.float64, device=device))
        buffer = torch.cat(parts)
        dist.all_reduce(buffer)
        offset = 0
        for name, key in entries:
            old = self.shared_state.get(name, {}).get(key)
            if old is None:
                old = torch.zeros(self.shapes[name], dtype=self.dtypes[name], device=device)
            count = old.numel()
            self.shared_state.setdefault(name, {})[key] = (
                old.double() + buffer[offset:offset + count].view(old.shape) / total).to(old.dtype)
            offset += count
        return comm.tensor_nbytes(buffer)

    def _shared_state_keys(self, name: str, trained: dict | None) -> set[str]:
        """Shaped optimizer-state keys of shared tensor `name`: every rank's optimizer keeps the same ones."""
        keys = set(self.shared_state.get(name, {}))
        for key, value in (trained or {}).get(name, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                keys.add(key)
        return keys

    def _average_shared(self, state: dict[str, torch.Tensor], ok: bool, weight: float, total: float) -> int:
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
    def gather(self, ist: ISTModel) -> None:
        """Assemble the full model in rank 0's ``ist.model`` (every rank calls this).

        Rank 0 takes one rank's part at a time and writes it in before the
        next arrives, so it holds the full model plus one part, never all
        parts at once. Homes go first: they hold stale copies of elements
        that a slice holds fresh, and the slices are written over them.
        """
        device = self.comm_device
        held_round = self.held_for
        slices, _ = self.round_slices(held_round)
        if self.rank != 0:
            if self.homed:
                dist.send(comm.pack([self.home[n] for n in self.homed], None, device=device), 0,
                          tag=message_tag(held_round, _KIND_GATHER_HOME))
            dist.send(comm.pack([self.held[n] for n in self.cut], None, device=device), 0,
                      tag=message_tag(held_round, _KIND_GATHER))
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
                    dist.recv(buffer, j, tag=message_tag(held_round, _KIND_GATHER_HOME))
                    homes = comm.unpack(buffer, specs)
                for name, part in zip(self.homed, homes):
                    bounds = self.home_bounds[name]
                    ist.state_tensor(name)[int(bounds[j]):int(bounds[j + 1])].copy_(part)
                del homes
            for j in range(self.world_size):
                if j == 0:
                    held = [self.held[n] for n in self.cut]
                else:
                    specs = [comm.Spec(self.slice_shape(slices, n, j), self.dtypes[n]) for n in self.cut]
                    buffer = torch.empty(comm.packed_nbytes(specs), dtype=torch.uint8, device=device)
                    dist.recv(buffer, j, tag=message_tag(held_round, _KIND_GATHER))
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
        """The model gathered onto rank 0 for the duration of the block (None on the others), then
        dropped again. Every rank must enter it."""
        self.gather(ist)
        try:
            yield ist.model if self.rank == 0 else None
        finally:
            if self.rank == 0:
                release_model(ist)
                self.gathered = False

    def finish(self, ist: ISTModel) -> None:
        """End of training: leave the trained model in rank 0's ``ist.model`` (gathered), unless
        :attr:`gather_on_finish` is False (the model stays sharded: save it with :meth:`save_model`)."""
        if self.prepared and self.gather_on_finish:
            self.gather(ist)

    # -- checkpoints -------------------------------------------------------------------------
    gather_on_finish = True
    """Whether :meth:`finish` gathers the model onto rank 0 (``istfx train --save`` turns it off and writes
    a sharded checkpoint instead)."""

    checkpoints_carried_state = True  # the DCP checkpoint holds optimizer state and outer momentum

    def save_checkpoint(self, ist: ISTModel, root: str | os.PathLike, round: int, rank_state: dict,
                        manifest: dict, keep: int | None = None) -> None:
        """A DCP checkpoint (:mod:`istfx.runtime.dcp_checkpoint`): every rank moves its units' rows to
        their canonical rank (one all-to-all per tensor, in place of the homes) and writes its rows,
        with the optimizer state and outer momentum they carry; the shared tensors are written once;
        each rank its RNG state and data position; rank 0 the manifest once all files exist."""
        directory = ckpt.round_dir(root, round)
        extra = self._write_dcp(directory)
        ckpt.save_rank(directory, self.rank, dict(rank_state))
        dist.barrier()
        if self.rank == 0:
            ckpt.write_manifest(root, round, {**manifest, **extra, "format": dcp_ckpt.FORMAT,
                                              "world_size": self.world_size}, keep)
        dist.barrier()

    def save_model(self, path: str | os.PathLike) -> None:
        """Write the trained model as a sharded DCP checkpoint directory at `path` (every rank calls this;
        no rank gathers). :func:`istfx.runtime.export.export` makes one safetensors file of it."""
        path = Path(path)
        if self.rank == 0:
            (path / ckpt.MANIFEST).unlink(missing_ok=True)  # complete again only once the new files are written
        extra = self._write_dcp(path, model_only=True)
        dist.barrier()
        if self.rank == 0:
            body = {"round": self.held_for, "next_round": self.held_for + 1, "format": dcp_ckpt.FORMAT,
                    "world_size": self.world_size, "model_only": True, "subnets": self.ist.plan.subnets,
                    "seed": self.ist.plan.seed, "topology": self.topology, "written": time.time(), **extra}
            ckpt.atomic_write_text(path / ckpt.MANIFEST, json.dumps(body, indent=2, sort_keys=True))
        dist.barrier()

    def _canonical(self, slices: RoundSlices, name: str, held: torch.Tensor,
                   home: torch.Tensor | None) -> torch.Tensor:
        """This rank's canonical rows of tensor `name` (one all-to-all): every rank sends each the rows of
        its slice that fall in the other's canonical rows. `home` (the same rows) is updated in place
        and returned; without one the rows are new (the slices cover every element)."""
        shape, me, world = self.shapes[name], self.rank, self.world_size
        start, stop = dcp_ckpt.row_range(shape[0], world, me)
        out = home if home is not None else torch.empty((stop - start, *shape[1:]), dtype=held.dtype,
                                                        device=held.device)
        sends, send_sizes, recv_specs = [], [], []
        mine = slices.indices[me][name]
        rows_mine = mine[0] if mine[0] is not None else torch.arange(shape[0])
        width = math.prod(held.shape[1:]) * held.element_size()
        for k in range(world):
            a, b = dcp_ckpt.row_range(shape[0], world, k)
            positions = torch.nonzero((rows_mine >= a) & (rows_mine < b)).flatten()
            sends.append(lambda positions=positions: held.index_select(0, positions.to(held.device)))
            send_sizes.append(len(positions) * width)
        for j in range(world):
            index = slices.indices[j][name]
            rows_j = index[0] if index[0] is not None else torch.arange(shape[0])
            positions = torch.nonzero((rows_j >= start) & (rows_j < stop)).flatten()
            block = [rows_j[positions] - start, *index[1:]]
            recv_specs.append((len(positions), block))
        received = self._all_to_all_bytes(sends, send_sizes, [
            n * math.prod(self.slice_shape(slices, name, j)[1:]) * held.element_size()
            for j, (n, _) in enumerate(recv_specs)])
        del sends
        for j, (n, block) in enumerate(recv_specs):
            if n:
                value = received[j].view(held.dtype).view((n, *self.slice_shape(slices, name, j)[1:]))
                put_block(out, block, value)
        return out

    def _from_canonical(self, slices: RoundSlices, name: str, canonical: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `name` under `slices`, from every rank's canonical rows (one all-to-all)."""
        shape, me, world = self.shapes[name], self.rank, self.world_size
        start, stop = dcp_ckpt.row_range(shape[0], world, me)
        sends, send_sizes = [], []
        for j in range(world):
            index = slices.indices[j][name]
            rows_j = index[0] if index[0] is not None else torch.arange(shape[0])
            positions = torch.nonzero((rows_j >= start) & (rows_j < stop)).flatten()
            block = [rows_j[positions] - start, *index[1:]]
            sends.append(lambda block=block: take_block(canonical, block))
            send_sizes.append(len(positions) * math.prod(self.slice_shape(slices, name, j)[1:])
                              * canonical.element_size())
        mine = slices.indices[me][name]
        rows_mine = mine[0] if mine[0] is not None else torch.arange(shape[0])
        held = torch.empty(self.slice_shape(slices, name, me), dtype=canonical.dtype, device=canonical.device)
        width = math.prod(held.shape[1:]) * held.element_size()
        places = []
        for k in range(world):
            a, b = dcp_ckpt.row_range(shape[0], world, k)
            places.append(torch.nonzero((rows_mine >= a) & (rows_mine < b)).flatten())
        received = self._all_to_all_bytes(sends, send_sizes, [len(p) * width for p in places])
        del sends
        for k, positions in enumerate(places):
            if len(positions):
                value = received[k].view(held.dtype).view((len(positions), *held.shape[1:]))
                put_block(held, [positions, *[None] * (held.dim() - 1)], value)
        return held

    def _all_to_all_bytes(self, sends: list, send_sizes: list[int], recv_sizes: list[int]) -> list[torch.Tensor]:
        """One ``all_to_all_single`` of raw bytes: `sends[k]()` (made one at a time, straight into the send
        buffer) goes to rank k; returns what each rank sent."""
        device = self.comm_device
        send = torch.empty(sum(send_sizes), dtype=torch.uint8, device=device)
        offset = 0
        for make, size in zip(sends, send_sizes):
            if size:
                piece = make().contiguous()
                send[offset:offset + size].copy_(piece.reshape(-1).view(torch.uint8))
                del piece
            offset += size
        output = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(output, send, recv_sizes, send_sizes)
        del send
        parts, offset = [], 0
        for size in recv_sizes:
            parts.append(output[offset:offset + size])
            offset += size
        return parts

    def _channels(self) -> list[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
        """(prefix, slices, homes) of every channel a checkpoint holds: the values, then each carried
        optimizer-state key and the outer momentum (homes of a channel that has none yet: zeros)."""
        out = [("", self.held, self.home)]
        for key in sorted(self.state_held):
            home = self.state_home.setdefault(key, {})
            for name in self.homed:
                if name not in home:
                    home[name] = torch.zeros_like(self.home[name])
            out.append((f"state/{key}/", self.state_held[key], home))
        return out

    def _write_dcp(self, directory: str | os.PathLike, model_only: bool = False) -> dict:
        """Write this rank's canonical rows (and, unless `model_only`, the carried state) under
        `directory`; returns the manifest entries (on rank 0)."""
        slices, _ = self.round_slices(self.held_for)
        state: dict[str, torch.Tensor | dcp_ckpt.RowShard] = {}
        channels = self._channels()[:1] if model_only else self._channels()
        with torch.no_grad():
            for prefix, held, home in channels:
                for name in self.cut:
                    rows = self._canonical(slices, name, held[name], home.get(name) if home is not None else None)
                    state[prefix + name] = dcp_ckpt.RowShard(rows, self.shapes[name])
        for name in self.shared_names:
            state[name] = self.shared[name]
        extra: dict = {"model_keys": list(self.trainable), "held_round": self.held_for}
        if not model_only:
            for name, entry in self.shared_state.items():
                for key, value in entry.items():
                    state[f"state/{key}/{name}"] = value
            for name, value in self.shared_outer.items():
                if value is not None:
                    state[f"state/{MOMENTUM_KEY}/{name}"] = value
            scalars: dict[str, dict[str, str]] = {}
            for name, entry in self.scalars.items():
                for key, value in entry.items():
                    kind = "tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                    if kind not in ("tensor", "int", "float"):
                        continue  # not a number: an optimizer's flag, rebuilt by the optimizer
                    scalars.setdefault(name, {})[key] = kind
                    state[f"scalar/{key}/{name}"] = value.detach().clone() if kind == "tensor" else \
                        torch.tensor(value, dtype=torch.float64 if kind == "float" else torch.int64)
            extra.update({
                "carried_state": not self.state_config.plain,
                "state_keys": sorted(self.state_held),
                "shared_state_keys": {n: sorted(e) for n, e in self.shared_state.items()},
                "shared_outer": sorted(n for n, v in self.shared_outer.items() if v is not None),
                "scalars": scalars,
            })
        table = dcp_ckpt.save(directory, state)
        del state
        return {**extra, "dcp": table} if self.rank == 0 else extra

    def _load_dcp(self, checkpoint: ckpt.Checkpoint, start_round: int) -> None:
        """Start from a DCP checkpoint, written by any number of ranks: read this rank's canonical rows
        (DCP reshards), then deal the slices of round ``start_round - 1`` (an all-to-all per tensor);
        the next round's exchange moves them on as in an uninterrupted run."""
        manifest = checkpoint.manifest
        table = manifest.get("dcp")
        if not isinstance(table, dict):
            raise ckpt.CheckpointError(f"{checkpoint.path / ckpt.MANIFEST}: a DCP checkpoint without its 'dcp' "
                                       "chunk table: the manifest is corrupt.")
        carried = bool(manifest.get("carried_state"))
        if not self.state_config.plain and not carried:
            raise ISTError(f"checkpoint {checkpoint.path} holds no optimizer state or outer momentum (written by a "
                           "run with optimizer_state='reset' and no outer step): resume it the same way, or start "
                           "again.")
        round = start_round - 1
        slices, _ = self.round_slices(round)
        device = self.comm_device
        keys = [""]
        if not self.state_config.plain:
            keys += [f"state/{k}/" for k in manifest.get("state_keys", [])]
        state: dict[str, torch.Tensor | dcp_ckpt.RowShard] = {}
        canonical: dict[str, dict[str, torch.Tensor]] = {}
        for prefix in keys:
            for name in self.cut:
                start, stop = dcp_ckpt.row_range(self.shapes[name][0], self.world_size, self.rank)
                rows = torch.empty((stop - start, *self.shapes[name][1:]), dtype=self.dtypes[name], device=device)
                canonical.setdefault(prefix, {})[name] = rows
                state[prefix + name] = dcp_ckpt.RowShard(rows, self.shapes[name])
        self.shared = {n: torch.empty(self.shapes[n], dtype=self.dtypes[n], device=device) for n in self.shared_names}
        state.update(self.shared)
        scalars = manifest.get("scalars", {}) if not self.state_config.plain else {}
        if not self.state_config.plain:
            for name, names in manifest.get("shared_state_keys", {}).items():
                for key in names:
                    state[f"state/{key}/{name}"] = torch.empty(self.shapes[name], dtype=self.dtypes[name],
                                                               device=device)
            for name in manifest.get("shared_outer", []):
                state[f"state/{MOMENTUM_KEY}/{name}"] = torch.empty(self.shapes[name], dtype=self.dtypes[name],
                                                                    device=device)
            for name, entry in scalars.items():
                for key in entry:
                    dtype = (table["tensors"].get(f"scalar/{key}/{name}") or {}).get("dtype", "float32")
                    state[f"scalar/{key}/{name}"] = torch.empty((), dtype=getattr(torch, dtype))
        dcp_ckpt.load(checkpoint.path, table, state)
        with torch.no_grad():
            self.held = {n: self._from_canonical(slices, n, canonical[""][n]) for n in self.cut}
            self.home = {n: canonical[""][n] for n in self.homed}  # homes are canonical rows
            for prefix in keys[1:]:
                key = prefix[len("state/"):-1]
                self.state_held[key] = {n: self._from_canonical(slices, n, canonical[prefix][n]) for n in self.cut}
                self.state_home[key] = {n: canonical[prefix][n] for n in self.homed}
            if not self.state_config.plain:
                for name, names in manifest.get("shared_state_keys", {}).items():
                    self.shared_state[name] = {k: state[f"state/{k}/{name}"] for k in names}
                for name in manifest.get("shared_outer", []):
                    self.shared_outer[name] = state[f"state/{MOMENTUM_KEY}/{name}"]
                for name, entry in scalars.items():
                    for key, kind in entry.items():
                        value = state[f"scalar/{key}/{name}"]
                        self.scalars.setdefault(name, {})[key] = value if kind == "tensor" else \
                            (float(value) if kind == "float" else int(value))
        del canonical, state
        self.held_for = round
