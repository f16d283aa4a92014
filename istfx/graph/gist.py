"""GIST: independent sub-GCNs trained on Cluster-GCN mini-batches.

Usage::

    import istfx
    from istfx.graph import gist, graphs
    from istfx.models import GCN

    graph = graphs.sbm(20_000, num_classes=8, avg_degree=20, num_features=64)
    model = GCN(graph.num_features, 256, graph.num_classes)
    ist = istfx.compile(model, subnets=4, example_inputs=gist.example_inputs(graph))
    data = gist.ClusterData(graph, parts=100, clusters_per_batch=5, mode="same")
    history = istfx.fit(ist, data, rounds=20, local_steps=10, loss_fn=gist.node_loss,
                        eval_data=gist.eval_batches(graph, "val"))
    graphs.evaluate_nodes(model, graph, "test")     # {"accuracy", "micro_f1", ...}

The hidden feature dimensions of the graph convolutions are split among
sub-GCNs (the compiler finds them); this module supplies the data side:

- :class:`ClusterData` is the ``train_data`` of :func:`istfx.fit`: a function
  ``subnet -> batches`` of Cluster-GCN mini-batches. ``mode="same"`` gives
  every sub-GCN the same batches (the GIST paper); ``"shuffled"`` gives each
  its own random unions of all clusters; ``"disjoint"`` deals the clusters
  out, so each sub-GCN (and each worker) only ever touches its own share of
  the graph.
- :func:`node_loss` (from :mod:`istfx.graph.graphs`) is the loss: cross-entropy
  over labelled nodes (multi-label: binary cross-entropy), nodes marked
  :data:`~istfx.graph.graphs.IGNORE_INDEX` left out.
- :func:`eval_batches` is the ``eval_data``: the full graph as one batch,
  scored on a mask. :func:`istfx.fit` then reports accuracy, which equals
  micro-F1 for single-label classes; :func:`istfx.graph.graphs.evaluate_nodes`
  gives micro-F1 for multi-label graphs too.
"""
from __future__ import annotations

import os
import time

import torch

from istfx.graph.graphs import ClusterBatches, Graph, GraphError, Partition, masked_targets, metis_clusters, node_loss

__all__ = ["MODES", "ClusterData", "eval_batches", "example_inputs", "node_loss"]

MODES = ("same", "shuffled", "disjoint")


def eval_batches(graph: Graph, mask: str | torch.Tensor | None = "test") -> list:
    """The full graph as one batch ``((x, edge_index), targets)``, labels kept only on `mask`'s nodes."""
    if graph.y is None:
        raise GraphError(f"{graph.name} has no labels to evaluate against.")
    keep = graph.mask(mask)
    if not bool(keep.any()):
        raise GraphError(f"the {mask if isinstance(mask, str) else 'given'} mask of {graph.name} selects no node.")
    return [((graph.x, graph.edge_index), masked_targets(graph.y, keep))]


def example_inputs(graph: Graph, nodes: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Small ``(x, edge_index)`` example inputs for :func:`istfx.compile`: the first `nodes` nodes' subgraph.

    Any graph works (shapes are captured as dynamic); this one has the
    graph's feature width and dtype and at least one edge.
    """
    n = max(2, min(nodes, graph.num_nodes))
    x = graph.x[:n].clone()
    edges = graph.edge_index[:, (graph.edge_index < n).all(dim=0)]
    if edges.shape[1] == 0:
        edges = torch.tensor([[0, 1], [1, 0]])
    return x, edges.clone()


class ClusterData:
    """Cluster-GCN training data for GIST: ``data(subnet)`` gives that sub-GCN's batches.

    The graph is partitioned once with METIS (cached on disk, see
    :func:`istfx.graph.graphs.metis_clusters`); ``partition_seconds`` says how long
    that took here (a cache hit is near zero).

    Args:
        graph: the training graph (its train mask selects the labelled nodes).
        parts: METIS clusters.
        clusters_per_batch: q, clusters joined into one mini-batch.
        mode: ``"same"`` (every sub-GCN sees the same batch sequence, as in
            the GIST paper), ``"shuffled"`` (each sub-GCN its own shuffle of
            all clusters) or ``"disjoint"`` (the clusters are dealt out
            among `subnets` sub-GCNs, each trains on its own).
        subnets: sub-GCNs, needed by ``"disjoint"``.
        seed: seeds the partition and the shuffles.
        cache: where METIS results are cached (see ``metis_clusters``).
    """

    def __init__(
        self,
        graph: Graph,
        parts: int,
        clusters_per_batch: int = 1,
        *,
        mode: str = "same",
        subnets: int | None = None,
        seed: int = 0,
        cache: bool | str | os.PathLike = True,
    ) -> None:
        if mode not in MODES:
            raise GraphError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}.")
        if mode == "disjoint":
            if isinstance(subnets, bool) or not isinstance(subnets, int) or subnets < 1:
                raise GraphError("mode='disjoint' deals the clusters out among the sub-GCNs: pass subnets=S.")
            if subnets > parts:
                raise GraphError(f"mode='disjoint' needs at least one cluster per sub-GCN: parts={parts} < "
                                 f"subnets={subnets}.")
        self.graph = graph
        self.mode = mode
        self.subnets = subnets
        self.seed = int(seed)
        self.clusters_per_batch = clusters_per_batch
        start = time.perf_counter()
        cluster = metis_clusters(graph.edge_index, graph.num_nodes, parts, seed=self.seed, cache=cache)
        self.partition_seconds = time.perf_counter() - start
        self.partition = Partition(graph, cluster)
        self._deal = None
        if mode == "disjoint":
            generator = torch.Generator().manual_seed(self.seed)
            self._deal = torch.randperm(self.partition.parts, generator=generator)

    def clusters_of(self, subnet: int) -> torch.Tensor:
        """The cluster ids sub-GCN `subnet` draws from."""
        if self._deal is None:
            return torch.arange(self.partition.parts)
        return torch.sort(self._deal[subnet % self.subnets::self.subnets]).values

    def __call__(self, subnet: int) -> ClusterBatches:
        """The batches of sub-GCN slot `subnet` (a fresh iterator state: epoch 0)."""
        seed = self.seed if self.mode == "same" else self.seed * 7919 + 104_729 * (subnet + 1)
        return ClusterBatches(self.partition, self.clusters_per_batch, seed=seed, clusters=self.clusters_of(subnet))

    def __repr__(self) -> str:
        return (f"ClusterData({self.graph.name}, {self.partition.parts} clusters, q={self.clusters_per_batch}, "
                f"mode={self.mode!r})")
