"""Server strategies: IST subnets dealt to sampled clients, and Flower's FedAvg with the same bookkeeping.

:class:`ISTStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy`
that keeps the full model (an :class:`~istfx.core.compiler.ISTModel`) on the
server. Each round it

1. draws the plan's assignment for the round (``ist.decompose(round)``),
2. samples ``participation`` of the connected clients (seeded by round),
3. deals the S subnet slots among them: client ``k`` of the sample gets slot
   ``k mod S`` (with more clients than subnets several clients train the same
   slot; with ``sizes``, slot = the client's capacity class, given in the
   order clients are first seen (sorted node ids), mod S, so a client always
   gets the same size),
4. sends each client only its slot's tensors and a
   :class:`~istfx.flower.wire.SubnetDescription`,
5. averages the replies of clients that trained the same slot (weighted by
   samples) and reassembles (``ist.reassemble``: units held by several slots
   are averaged, units of slots nobody returned keep their previous values).

Clients that fail, die or time out are left out of the round and logged with
the slot and units they held. :class:`RecordingFedAvg` is Flower's FedAvg
unchanged, plus the same per-round record (clients, bytes, memory, compute).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from istfx.core.compiler import ISTModel, SubnetInfo
from istfx.errors import ISTError
from istfx.flower.wire import (
    WireError,
    describe,
    payload_bytes,
    record_to_tensors,
    tensors_to_record,
)

__all__ = ["ClientReport", "ISTStrategy", "RecordingFedAvg", "RoundStats", "deal_slots", "sample_clients"]

log = logging.getLogger("istfx.flower")


@dataclass
class ClientReport:
    """One sampled client in one round: its slot, and what it reported (or why it dropped)."""

    node: int
    slot: int
    bytes_down: int
    partition: int | None = None
    metrics: dict = field(default_factory=dict)
    dropped: str | None = None  # the reason, when it did not contribute


@dataclass
class RoundStats:
    """A round's clients and the aggregate numbers of the per-round metrics row."""

    round: int  # Flower's server round (from 1)
    clients: list[ClientReport] = field(default_factory=list)
    kept_previous: dict[int, int] = field(default_factory=dict)  # slot -> units that kept previous values

    @property
    def responded(self) -> list[ClientReport]:
        """Clients whose update was used."""
        return [c for c in self.clients if c.dropped is None]

    def row(self) -> dict:
        """The client-side fields of the metrics row."""
        ok = self.responded
        mean = (lambda key: sum(c.metrics.get(key, 0) for c in ok) / len(ok) if ok else None)
        down = sum(c.bytes_down for c in ok) / len(ok) if ok else None
        samples = sum(c.metrics.get("num-examples", 0) for c in ok)
        loss = (sum(c.metrics.get("train-loss", 0.0) * c.metrics.get("num-examples", 0) for c in ok) / samples
                if samples else None)
        return {
            "clients_sampled": len(self.clients),
            "clients_responded": len(ok),
            "clients_dropped": len(self.clients) - len(ok),
            "bytes_down_per_client": down,
            "bytes_up_per_client": mean("bytes-up"),
            "bytes_total": sum(c.bytes_down for c in self.clients) + sum(c.metrics.get("bytes-up", 0) for c in ok),
            "client_peak_memory_bytes": max((c.metrics.get("peak-memory", 0) for c in ok), default=None),
            "client_compute_seconds": mean("compute-seconds"),
            "train_loss": loss,
            "slots": {str(c.partition if c.partition is not None else c.node): c.slot for c in ok},
            "dropped": [{"node": c.node, "slot": c.slot, "reason": c.dropped} for c in self.clients if c.dropped],
            "units_kept": {str(slot): units for slot, units in self.kept_previous.items()},
            "clients": [{"node": c.node, "partition": c.partition, "slot": c.slot, "bytes_down": c.bytes_down,
                         "bytes_up": c.metrics.get("bytes-up"), "samples": c.metrics.get("num-examples"),
                         "held_elements": c.metrics.get("held-elements"),
                         "full_elements": c.metrics.get("full-elements")} for c in ok],
        }


def sample_clients(nodes: Iterable[int], participation: float, seed: int, round: int) -> list[int]:
    """``max(1, round(participation * N))`` of the `nodes`, drawn by a generator seeded by (seed, round),
    in the order drawn."""
    nodes = sorted(nodes)
    if not nodes:
        return []
    count = max(1, min(len(nodes), int(math.floor(participation * len(nodes) + 0.5))))
    rng = np.random.default_rng([int(seed), int(round), 7_654_321])
    return [nodes[i] for i in rng.permutation(len(nodes))[:count]]


def deal_slots(sampled: list[int], subnets: int, capacity: dict[int, int] | None = None) -> dict[int, int]:
    """node -> subnet slot: ``k mod S`` for the k-th sampled client, or, given `capacity`
    (node -> capacity class), each node's class."""
    if capacity is not None:
        return {n: capacity[n] for n in sampled}
    return {n: k % subnets for k, n in enumerate(sampled)}


def _answered(stats, replies: Iterable[Message]):
    """(client, reply) for each reply of a client sampled this round; error replies mark their client dropped."""
    by_node = {c.node: c for c in stats.clients}
    for reply in replies:
        client = by_node.get(reply.metadata.src_node_id)
        if client is None:
            continue
        if reply.has_error():
            client.dropped = f"error reply: {reply.error.reason}"
            continue
        yield client, reply


def _average(parts: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Weighted mean of same-shaped tensors (integer tensors take the maximum)."""
    if len(parts) == 1:
        return parts[0][0]
    first = parts[0][0]
    if not first.is_floating_point():
        return torch.stack([t for t, _ in parts]).amax(0)
    total = sum(w for _, w in parts)
    return (sum(t.double() * w for t, w in parts) / total).to(first.dtype)


class ISTStrategy(Strategy):
    """IST on a Flower federation: each client trains one subnet of the server's model (see the module doc).

    Args:
        ist: the compiled model; its ``model`` is the global model, updated in place every round.
        participation: fraction of the connected clients sampled per round.
        seed: seed of the sampling (the assignment's seed is the plan's).
        round_timeout: seconds to wait for the replies (used as the messages' TTL too).
    """

    def __init__(self, ist: ISTModel, participation: float = 1.0, seed: int = 0,
                 round_timeout: float = 600.0) -> None:
        self.ist = ist
        self.participation = participation
        self.seed = seed
        self.round_timeout = round_timeout
        self.stats: dict[int, RoundStats] = {}
        self._sent: dict[int, dict[str, torch.Tensor]] = {}  # slot -> tensors sent this round
        self._subnets: list = []
        self._requires_grad = {n: p.requires_grad for n, p in ist.model.named_parameters()}
        self.capacity: dict[int, int] = {}  # node -> capacity class (with sizes), fixed when first seen

    def summary(self) -> None:
        """Log the strategy's configuration."""
        plan = self.ist.plan
        log.info("ISTStrategy: %d subnets (%s), participation %.3g, %d of %d parameters per subnet at most",
                 plan.subnets, plan.to_dict()["policy"], self.participation,
                 max(plan.parameters_per_subnet), plan.parameters_full)

    # -- training ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients, deal the round's subnet slots and build one message per client."""
        ist, plan = self.ist, self.ist.plan
        round = server_round - 1
        nodes = sorted(grid.get_node_ids())
        sampled = sample_clients(nodes, self.participation, self.seed, round)
        for node in nodes:
            self.capacity.setdefault(node, len(self.capacity) % plan.subnets)
        slots = deal_slots(sampled, plan.subnets, self.capacity if plan.sizes is not None else None)
        self._subnets = ist.decompose(round)  # opens the round; its subnets are the assignment's slices
        slices = ist.slices(round)
        held = plan.block_assignment(round)
        self._sent = {}
        stats = RoundStats(server_round)
        messages = []
        for node in sampled:
            slot = slots[node]
            if slot not in self._sent:
                template = ist.template(slot, held[slot])
                self._sent[slot] = {n: slices.take(n, ist.state_tensor(n).detach(), slot)
                                    for n in plan.state_kinds if n in template.used}
            tensors = self._sent[slot]
            body = ConfigRecord({**dict(config), **describe(ist, round, slot).to_config(), "strategy": "ist",
                                 "server-round": server_round})
            content = RecordDict({"arrays": tensors_to_record(tensors), "config": body})
            messages.append(Message(content=content, message_type="train", dst_node_id=node,
                                    group_id=str(server_round), ttl=self.round_timeout))
            stats.clients.append(ClientReport(node, slot, payload_bytes(tensors)))
        self.stats[server_round] = stats
        log.info("round %d: %d of %d clients sampled, slots %s", server_round, len(sampled), len(nodes),
                 {n: slots[n] for n in sampled})
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the replies per slot and reassemble; clients that failed keep their units' values."""
        ist, plan = self.ist, self.ist.plan
        stats = self.stats[server_round]
        per_slot: dict[int, list[tuple[dict[str, torch.Tensor], float]]] = {}
        for client, reply in _answered(stats, replies):
            try:
                tensors, metrics = self._read_reply(reply, client.slot)
            except (ISTError, KeyError, TypeError, ValueError) as exc:
                client.dropped = f"bad reply: {exc}"
                continue
            client.metrics = metrics
            client.partition = int(metrics["partition-id"]) if "partition-id" in metrics else None
            per_slot.setdefault(client.slot, []).append((tensors, max(float(metrics.get("num-examples", 1)), 1.0)))
        for client in stats.clients:
            if client.dropped is None and not client.metrics:
                client.dropped = f"no reply within {self.round_timeout:g} s"
        subnets, weights = [], []
        for slot, parts in sorted(per_slot.items()):
            values = dict(self._sent[slot])
            for name in set.intersection(*(set(p) for p, _ in parts)):  # what every client of the slot returned
                values[name] = _average([(p[name], w) for p, w in parts])
            template = ist.template(slot, plan.block_assignment(server_round - 1)[slot])
            subnet = template.instantiate(values, self._requires_grad)
            subnet.istfx_subnet = SubnetInfo(plan.token, server_round - 1, slot)
            subnets.append(subnet)
            weights.append(sum(w for _, w in parts))
        for client in stats.clients:
            if client.dropped:
                log.warning("round %d: client node %d (partition %s, slot %d) dropped: %s", server_round,
                            client.node, client.partition, client.slot, client.dropped)
        missing = sorted({c.slot for c in stats.clients} - set(per_slot))
        for slot in missing:
            units = sum(plan.counts(plan.groups[g])[slot] for g in plan.split)
            stats.kept_previous[slot] = units
            log.warning("round %d: no client returned slot %d: its %d units keep their previous values",
                        server_round, slot, units)
        if subnets:
            report = ist.reassemble(subnets, weights=weights)
            for slot, reason in report.rejected.items():
                log.warning("round %d: slot %d rejected: %s", server_round, slot, reason)
        else:
            log.warning("round %d: no client responded; the model is unchanged", server_round)
        row = stats.row()
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        return None, MetricRecord(metrics)

    def _read_reply(self, reply: Message, slot: int) -> tuple[dict[str, torch.Tensor], dict]:
        content = reply.content
        if "arrays" not in content or "metrics" not in content:
            raise WireError("the reply lacks its `arrays` or `metrics` record")
        sent = self._sent[slot]
        trainable = set(self.ist.trainable_state)
        names = list(content["arrays"].keys())
        unknown = [n for n in names if n not in sent or n not in trainable]
        if unknown:
            raise WireError(f"the reply holds tensors the slot does not train: {unknown[:4]}")
        expected = {n: (tuple(sent[n].shape), sent[n].dtype) for n in names}
        tensors = record_to_tensors(content["arrays"], expected)
        metrics = dict(content["metrics"])
        metrics["bytes-up"] = payload_bytes(tensors)  # measured here, not taken on trust
        return tensors, metrics

    # -- no client-side evaluation: the server evaluates the full model -------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """None: the server evaluates the full model (``evaluate_fn``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """None (no client-side evaluation)."""
        return None


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping the same per-round record as :class:`ISTStrategy` and sampling the same clients.

    Aggregation is Flower's. Sampling is not Flower's unseeded ``random.sample``
    but :func:`sample_clients` with `seed` and ``fraction_train``, as
    :class:`ISTStrategy` samples: given the same nodes, seed and participation
    both strategies train the same nodes every round. (Separate federations get
    random node IDs from their SuperLink, so their samples, taken by rank among
    the sorted IDs, are different partitions.)
    """

    def __init__(self, *args, seed: int = 0, round_timeout: float = 600.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.round_timeout = round_timeout
        self.stats: dict[int, RoundStats] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages to the seeded sample; records who was sampled and the bytes sent."""
        if self.fraction_train == 0.0:
            return []
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)  # waits for min_available_nodes
        sampled = sample_clients(nodes, self.fraction_train, self.seed, server_round - 1)
        log.info("round %d: %d of %d clients sampled", server_round, len(sampled), len(nodes))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, sampled, MessageType.TRAIN))
        down = sum(int(np.asarray(a.numpy()).nbytes) for a in arrays.values())
        self.stats[server_round] = RoundStats(server_round, [ClientReport(m.metadata.dst_node_id, -1, down)
                                                             for m in messages])
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate; records who replied, with their measurements."""
        replies = list(replies)
        stats = self.stats[server_round]
        for client, reply in _answered(stats, replies):
            metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
            metrics["bytes-up"] = sum(int(np.asarray(a.numpy()).nbytes) for a in reply.content["arrays"].values())
            client.metrics = metrics
            client.partition = int(metrics["partition-id"]) if "partition-id" in metrics else None
        for client in stats.clients:
            if client.dropped is None and not client.metrics:
                client.dropped = f"no reply within {self.round_timeout:g} s"
            if client.dropped:
                log.warning("round %d: client node %d dropped: %s", server_round, client.node, client.dropped)
        return super().aggregate_train(server_round, [r for r in replies if not r.has_error()])
