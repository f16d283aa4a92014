"""The parameter-server topology (``ps``, the original IST protocol) on torch.distributed.

Rank 0 holds the full model. Each round it decomposes it, sends every rank
its subnet's parameters and buffers as one flat buffer (point to point),
trains slot 0 itself, receives the trained slices back and reassembles them,
weighted by samples. The other ranks hold only the subnet of their round.

A rank that dies is known within a fraction of a second when ``istfx
train`` started the ranks (the launcher records every exit in
``ISTFX_STATUS_DIR``, :func:`istfx.runtime.launch.exited_ranks`); a hung
one by its heartbeat (``heartbeat_timeout``) and, last, the round timeout.
The round completes without it: its slot's update of that round is lost and
its units keep their previous values (``ISTModel.reassemble`` reports it as
missing). The rank is excluded, and from the next round on its slot is dealt
to a live rank (:meth:`TorchPSBackend.deal`: workers first, round-robin;
a rank then trains its slots one after the other), so every unit keeps
training; the job goes on. Completion is signalled through the
rendezvous store, never through a blocking receive, because a timed-out gloo
receive tears down the whole process group.

With ``fit(optimizer_state="carry")`` rank 0 also keeps the full-size
optimizer state: each worker receives its slice of it after its parameters
(announced in the header) and sends the trained state back after its update;
with ``outer_lr``/``outer_momentum`` rank 0 takes the outer step after
reassembly, the outer momentum kept next to the model
(:mod:`istfx.runtime.state_travel`).

Usage, inside a script started by ``torchrun --nproc-per-node 4``::

    backend = TorchPSBackend()            # or TorchDistBackend("ps")
    history = istfx.fit(ist, per_subnet_data, rounds=50, local_steps=10, backend=backend)

Every round's ``RoundResult.extra`` on rank 0 reports, per rank,
``bytes_sent`` and ``bytes_received`` (the point-to-point messages),
``failed`` (ranks left out this round and why), ``excluded``, ``missing``
and each rank's resident memory (``rss_mb``, ``rss_peak_mb``).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from istfx.core.compiler import ISTModel, ReassembleReport
from istfx.runtime import checkpoint as ckpt
from istfx.runtime import comm
from istfx.runtime.backend_api import RoundResult, SubnetResult, TrainSubnet, model_device
from istfx.runtime.launch import describe_exit, exit_reason, exited_ranks
from istfx.runtime.optim_state import attach, pack_state, trained_names, unpack_state
from istfx.runtime.state_travel import CentralState, StateConfig

from .memory import peak_rss_mb, rss_mb
from .model_storage import release_model, state_of
from .torch_base import TorchDistBackend, message_tag, rendezvous_store

__all__ = ["TorchPSBackend"]

_TRAIN, _STOP = 1, 0
_DOWN = 6  # int64 fields of rank 0's header: kind, round, optimizer-state layout bytes, optimizer-state bytes,
# the slot, and how many slots the worker trains this round (its own first, then any dealt to it)
_MAX_DEALT = 64  # tags leave room for this many slots per rank and round
_HEADER = 12  # float64 fields of a worker's result header (the last two: its optimizer state's layout and bytes)
_KIND_HEADER, _KIND_PAYLOAD, _KIND_RESULT, _KIND_UPDATE, _KIND_STATE, _KIND_STATE_BACK = range(6)


def _tag(round: int, j: int, kind: int) -> int:
    """The tag of message `kind` of the `j`-th slot a worker trains in `round`."""
    return message_tag(round * _MAX_DEALT + j, kind)


class TorchPSBackend(TorchDistBackend):
    """IST rounds with the full model on rank 0 and one subnet per worker rank (see the module docstring).

    Args:
        topology: ``"ps"`` (what ``TorchDistBackend("ps", ...)`` passes on).
        compress: ``None``, ``"int8"`` or ``"int4"``: the downlink carries
            quantized weights and the uplink quantized updates (trained minus
            received), added to rank 0's exact copy.
        round_timeout: seconds rank 0 waits for a round's results before
            going on without the missing ranks.
        heartbeat_timeout: a rank whose heartbeat stops for this long is taken
            as dead before the round timeout (None: off).
        timeout: the process group's timeout (collectives and blocking receives).
        init_from: a safetensors file with the initial model state, read by rank 0.
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available).
    """

    topology = "ps"

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
        self._check_topology(topology)
        super().__init__(compress=compress, timeout=timeout, init_from=init_from, backend=backend)
        self.round_timeout = float(round_timeout)
        self.heartbeat_timeout = None if not heartbeat_timeout else float(heartbeat_timeout)
        self.active = True  # workers: False once rank 0 excluded this rank
        self.failed: dict[int, str] = {}  # rank 0: excluded ranks and why
        self._stopped: set[int] = set()  # rank 0: excluded ranks already told to stop
        self._graveyard: list[Any] = []  # rank 0: abandoned works and their buffers stay alive
        self._central: CentralState | None = None  # rank 0: carried optimizer state and outer momentum
        self._exits_checked = 0.0  # rank 0: when the launcher's exit records were last read

    def configure_state(self, config: StateConfig) -> None:
        """Carry optimizer state / take the outer step: rank 0 keeps the full state and the outer momentum
        and ships each worker its state slice with its parameters (quantized with ``compress``)."""
        self.state_config = config
        self._central = None

    # -- set-up -------------------------------------------------------------------------------
    def load_state(self, ist: ISTModel, start_round: int, checkpoint: ckpt.Checkpoint | None) -> None:
        """Rank 0 takes the full model; the workers drop theirs and start their heartbeat."""
        self.store = rendezvous_store(self.timeout)
        if self.rank == 0:
            self.load_full_model(ist, checkpoint)
            now = time.monotonic()
            self._beats = {s: ("", now) for s in range(1, self.world_size)}
        else:
            release_model(ist)
            if self.heartbeat_timeout:
                self.start_heartbeat(self.heartbeat_timeout)

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

    # -- the round ------------------------------------------------------------------------------
    def train_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        if self.rank == 0:
            return self._server_round(ist, round, train_subnet)
        return self._worker_round(ist, round, train_subnet)

    def deal(self, round: int) -> dict[int, list[int]]:
        """Rank -> the slots it trains in `round`: its own, plus the slots of excluded ranks dealt round-robin
        over the live ranks (workers first), so no unit goes untrained once its rank is gone."""
        live = [r for r in range(1, self.world_size) if r not in self.failed]
        out = {r: [r] for r in [0, *live]}
        takers = [*live, 0]
        for i, slot in enumerate(sorted(self.failed)):
            out[takers[i % len(takers)]].append(slot)
        return out

    def _check_exits(self, ranks: Iterable[int]) -> dict[int, str]:
        """Ranks among `ranks` our launcher saw exit (``ISTFX_STATUS_DIR``), with what it saw; at most every 50 ms."""
        now = time.monotonic()
        if now - self._exits_checked < 0.05:
            return {}
        self._exits_checked = now
        status_dir = os.environ.get("ISTFX_STATUS_DIR")
        exited = exited_ranks(status_dir)
        return {r: f"rank {r} {exit_reason(status_dir, r) or describe_exit(exited[r])} (seen by the launcher)"
                for r in ranks if r in exited}

    def _server_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        start = time.perf_counter()
        world = self.world_size
        self._exits_checked = 0.0
        for r, reason in self._check_exits([r for r in range(1, world) if r not in self.failed]).items():
            self.failed[r] = f"before round {round}: {reason}"  # gone between rounds: nothing of it is lost
            warnings.warn(f"istfx: {reason}; its slot {r} is dealt to a live rank from round {round} on",
                          RuntimeWarning, stacklevel=2)
        subnets = ist.decompose(round)
        traffic = [comm.Traffic() for _ in range(world)]
        central, slices = None, None
        if not self.state_config.plain:
            if self._central is None:
                self._central = CentralState(ist, self.state_config)
            central, slices = self._central, self.round_slices(round)[0]
            central.begin(ist)
        for rank in [s for s in self.failed if s not in self._stopped]:
            header = torch.tensor([_STOP, round, 0, 0, 0, 0], dtype=torch.int64, device=self.comm_device)
            with contextlib.suppress(Exception):  # a dead rank refuses; a hung one reads it when it wakes
                self._graveyard.append((dist.isend(header, rank, tag=_tag(round, 0, _KIND_HEADER)), header))
            self._stopped.add(rank)
        deal = self.deal(round)
        trainer = {slot: rank for rank, slots in deal.items() for slot in slots}
        own = deal[0]
        if central is not None:
            for slot in own:
                attach(subnets[slot], central.for_subnet(slices, slot, self.slot_names(round, slot)))
        sends: list[tuple[int, Any, torch.Tensor]] = []
        receives: dict[int, tuple] = {}  # slot -> works and buffers
        for rank, slots in deal.items():
            if rank == 0:
                continue
            for j, s in enumerate(slots):
                names = self.slot_names(round, s)
                state = state_of(subnets[s])
                payload = comm.pack([state[n] for n in names], self.compress, device=self.comm_device)
                carried = central.for_subnet(slices, s, names) if central is not None else None
                state_buffer, layout_nbytes = (pack_state(carried, names, self.compress, self.comm_device)
                                               if carried else (None, 0))
                header = torch.tensor([_TRAIN, round, layout_nbytes,
                                       0 if state_buffer is None else state_buffer.numel(), s, len(slots)],
                                      dtype=torch.int64, device=self.comm_device)
                messages = [(header, _KIND_HEADER), (payload, _KIND_PAYLOAD)]
                if state_buffer is not None:
                    messages.append((state_buffer, _KIND_STATE))
                for tensor, kind in messages:
                    sends.append((rank, dist.isend(tensor, rank, tag=_tag(round, j, kind)), tensor))
                    traffic[0].add(sent=comm.tensor_nbytes(tensor))
                    traffic[rank].add(received=comm.tensor_nbytes(tensor))
        # Receives are posted after every send: NCCL runs a pair's operations in the order posted.
        position = {s: j for slots in deal.values() for j, s in enumerate(slots)}
        for rank, slots in deal.items():
            if rank == 0:
                continue
            for j, s in enumerate(slots):
                result_header = torch.zeros(_HEADER, dtype=torch.float64, device=self.comm_device)
                update = torch.empty(comm.packed_nbytes(self.slot_specs(round, s), self.compress),
                                     dtype=torch.uint8, device=self.comm_device)
                receives[s] = (
                    dist.irecv(result_header, rank, tag=_tag(round, j, _KIND_RESULT)), result_header,
                    dist.irecv(update, rank, tag=_tag(round, j, _KIND_UPDATE)), update,
                )
        home = model_device(ist.model)
        results: dict[int, SubnetResult] = {}
        returned_state: dict[int, Any] = {}
        for s in own:  # slot 0, then the slots dealt to rank 0
            results[s] = train_subnet(s, subnets[s])
            subnets[s].to(home)
            returned_state[s] = results[s].optimizer_state
        memory: dict[int, tuple[float | None, float | None]] = {0: (rss_mb(), peak_rss_mb())}
        failed_now: dict[int, str] = {}  # rank -> why
        lost: dict[int, int] = {}  # slot -> the rank that was training it
        deadline = start + self.round_timeout
        pending = set(receives)

        def drop(rank: int, reason: str) -> None:
            failed_now[rank] = reason
            for slot in [s for s in pending if trainer[s] == rank]:
                lost[slot] = rank
                self._graveyard.append(receives[slot])
                pending.discard(slot)

        while pending:
            for r, reason in self._check_exits({trainer[s] for s in pending}).items():
                drop(r, reason)
            for s in sorted(pending):
                rank = trainer[s]
                if s not in pending:
                    continue
                key = self._done_key(round, s)
                if self.store.check([key]):
                    work_h, head, work_u, update = receives[s]
                    try:
                        work_h.wait()
                        work_u.wait()
                    except Exception as exc:  # the rank went away while sending
                        drop(rank, f"connection lost: {str(exc).splitlines()[0][:160]}")
                        continue
                    with contextlib.suppress(Exception):
                        self.store.delete_key(key)
                    values = head.double().cpu().tolist()
                    results[s] = SubnetResult(
                        samples=int(values[1]), loss_sum=values[2],
                        correct=None if values[3] < 0 else int(values[3]), steps=int(values[4]),
                    )
                    memory[rank] = (values[5] if values[5] >= 0 else None, values[6] if values[6] >= 0 else None)
                    traffic[rank].add(sent=head.numel() * 8 + update.numel())
                    traffic[0].add(received=head.numel() * 8 + update.numel())
                    self.write_update(round, s, subnets[s], update)
                    if int(values[11]) > 0:  # the worker's trained optimizer state follows its update
                        back = torch.empty(int(values[11]), dtype=torch.uint8, device=self.comm_device)
                        dist.recv(back, rank, tag=_tag(round, position[s], _KIND_STATE_BACK))
                        returned_state[s] = unpack_state(back, int(values[10]), self.compress)
                        traffic[rank].add(sent=back.numel())
                        traffic[0].add(received=back.numel())
                    pending.discard(s)
                else:
                    stale = self._heartbeat_stale(rank)
                    if stale is not None:
                        drop(rank, f"rank {rank} died: no heartbeat for {stale:.1f}s")
            if pending and time.perf_counter() > deadline:
                for rank in sorted({trainer[s] for s in pending}):
                    drop(rank, f"no result within the round timeout ({self.round_timeout:g}s)")
            if pending:
                time.sleep(0.002)
        for rank, work, tensor in sends:
            if rank in failed_now:
                self._graveyard.append((work, tensor))
            else:
                work.wait()
        for rank, reason in failed_now.items():
            self.failed[rank] = f"round {round}: {reason}"
            slots = sorted(s for s, r in lost.items() if r == rank)
            warnings.warn(f"istfx: rank {rank} left out of round {round} and excluded: {reason}; the update of "
                          f"slot{'s' * (len(slots) > 1)} {', '.join(map(str, slots))} in this round is lost "
                          "(those units keep their values), and from the next round on the live ranks train "
                          "its slot", RuntimeWarning, stacklevel=2)
        accepted = sorted(results)
        report = ist.reassemble(
            [subnets[s] for s in accepted], weights=[max(results[s].samples, 1) for s in accepted],
            on_nonfinite="skip",
        )
        if central is not None:
            central.finish(ist, slices, {s: returned_state.get(s) for s in report.accepted},
                           {s: trained_names(subnets[s]) for s in report.accepted},
                           {s: max(results[s].samples, 1) for s in report.accepted})
        parameters, sizes = self.slot_sizes(round)
        all_results = [results.get(s, SubnetResult(samples=0, loss_sum=0.0, correct=None, steps=0))
                       for s in range(world)]
        dead = set(self.failed)
        extra = {
            "topology": "ps",
            "compress": self.compress or "none",
            "bytes_sent": [None if s in dead and s not in deal else traffic[s].sent for s in range(world)],
            "bytes_received": [None if s in dead and s not in deal else traffic[s].received
                               for s in range(world)],
            "failed": {int(s): r for s, r in sorted(failed_now.items())},
            "excluded": sorted(int(s) for s in dead),
            "missing": list(report.missing),
            "lost": {int(s): int(r) for s, r in sorted(lost.items())},
            "dealt": {int(s): int(r) for s, r in sorted(trainer.items()) if s != r},
            "rss_mb": [memory.get(s, (None, None))[0] for s in range(world)],
            "rss_peak_mb": [memory.get(s, (None, None))[1] for s in range(world)],
        }
        return RoundResult(round=round, results=all_results, report=report, parameters_per_subnet=parameters,
                           bytes_per_subnet=sizes, seconds=time.perf_counter() - start, extra=extra)

    def _worker_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        start = time.perf_counter()
        parameters, sizes = self.slot_sizes(round)
        header = None
        if self.active:
            header = torch.zeros(_DOWN, dtype=torch.int64, device=self.comm_device)
            dist.recv(header, 0, tag=_tag(round, 0, _KIND_HEADER))
            if int(header[0]) == _STOP:
                self.active = False
        if not self.active:
            report = ReassembleReport(round, missing=[self.rank])
            return RoundResult(round, [SubnetResult(0, 0.0, None, 0) for _ in range(self.world_size)], report,
                               parameters, sizes, time.perf_counter() - start, {"excluded": [self.rank]})
        results = [SubnetResult(0, 0.0, None, 0) for _ in range(self.world_size)]
        trained, sent, received = [], 0, 0
        for j in range(int(header[5])):  # this rank's own slot, then any slot dealt to it
            if j > 0:
                header = torch.zeros(_DOWN, dtype=torch.int64, device=self.comm_device)
                dist.recv(header, 0, tag=_tag(round, j, _KIND_HEADER))
            slot = int(header[4])
            result, up, down = self._train_slot(round, j, slot, header, train_subnet, start)
            results[slot] = result
            trained.append(slot)
            sent += up
            received += down
        report = ReassembleReport(round, accepted=trained)
        extra = {"bytes_sent": sent, "bytes_received": received}
        return RoundResult(round, results, report, parameters, sizes, time.perf_counter() - start, extra)

    def _train_slot(self, round: int, j: int, slot: int, header: torch.Tensor, train_subnet: TrainSubnet,
                    start: float) -> tuple[SubnetResult, int, int]:
        """Receive slot `slot` (the `j`-th this rank trains in `round`), train it, send it back;
        returns (result, bytes sent, bytes received)."""
        names = self.slot_names(round, slot)
        specs = self.slot_specs(round, slot)
        payload = torch.empty(comm.packed_nbytes(specs, self.compress), dtype=torch.uint8, device=self.comm_device)
        dist.recv(payload, 0, tag=_tag(round, j, _KIND_PAYLOAD))
        received = comm.tensor_nbytes(header) + payload.numel()
        values = comm.unpack(payload, specs, self.compress)
        del payload
        carried = None
        if int(header[3]) > 0:  # the optimizer state this slot's units carry
            buffer = torch.empty(int(header[3]), dtype=torch.uint8, device=self.comm_device)
            dist.recv(buffer, 0, tag=_tag(round, j, _KIND_STATE))
            received += buffer.numel()
            carried = unpack_state(buffer, int(header[2]), self.compress)
            del buffer
        tensors = {n: v.to(self.device) for n, v in zip(names, values)}
        base = ({n: v.clone() for n, v in tensors.items() if v.is_floating_point()}
                if self.compress is not None else {})
        subnet = self.instantiate(round, slot, tensors)
        attach(subnet, carried)
        result = train_subnet(slot, subnet)
        self.after_local_training(round, subnet)
        state = state_of(subnet)
        with torch.no_grad():
            out = [state[n].detach() - base[n].to(state[n].device) if n in base else state[n].detach()
                   for n in names]
            update = comm.pack(out, self.compress, device=self.comm_device)
        del out
        back, back_layout = (pack_state(result.optimizer_state, names, self.compress, self.comm_device)
                             if self.state_config.carry and result.optimizer_state else (None, 0))
        rss, peak = rss_mb(), peak_rss_mb()
        head = torch.tensor(
            [round, result.samples, result.loss_sum, -1 if result.correct is None else result.correct,
             result.steps, -1 if rss is None else rss, -1 if peak is None else peak,
             time.perf_counter() - start, received, 0.0, back_layout, 0 if back is None else back.numel()],
            dtype=torch.float64, device=self.comm_device,
        )
        works = [dist.isend(head, 0, tag=_tag(round, j, _KIND_RESULT)),
                 dist.isend(update, 0, tag=_tag(round, j, _KIND_UPDATE))]
        # The state goes last: rank 0 receives it once it has read the header that announces it.
        state_work = dist.isend(back, 0, tag=_tag(round, j, _KIND_STATE_BACK)) if back is not None else None
        for work in works:
            work.wait()
        self.store.set(self._done_key(round, slot), b"1")
        if state_work is not None:
            state_work.wait()
        sent = head.numel() * 8 + update.numel() + (0 if back is None else back.numel())
        return result, sent, received

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, ist: ISTModel, root: str | os.PathLike, round: int, rank_state: dict,
                        manifest: dict, keep: int | None = None) -> None:
        """Rank 0 writes the full model; every live rank its RNG state and data position; rank 0 the
        manifest once the live ranks' files exist (or the round timeout passed)."""
        directory = ckpt.round_dir(root, round)
        meta = dict(rank_state)
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
