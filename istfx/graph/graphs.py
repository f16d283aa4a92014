"""Graphs for GIST: validated node-classification data, METIS clusters, Cluster-GCN batches.

Usage::

    from istfx.graph import graphs

    graph = graphs.sbm(20_000, num_classes=8, avg_degree=20, num_features=64, seed=0)
    cluster = graphs.metis_clusters(graph.edge_index, graph.num_nodes, parts=100, seed=0)
    partition = graphs.Partition(graph, cluster)
    for (x, edge_index), targets in graphs.ClusterBatches(partition, clusters_per_batch=5, seed=0):
        logits = model(x, edge_index)            # a batch: the subgraph induced by 5 random clusters
        loss = graphs.node_loss(logits, targets)  # targets: training labels, IGNORE_INDEX elsewhere
    scores = graphs.evaluate_nodes(model, graph, "test")   # accuracy and micro-F1 on the full graph

- :class:`Graph` holds ``x [N, F]``, ``edge_index [2, E]`` (PyG's layout: row 0
  source, row 1 target), labels ``y`` (``[N]`` class ids, or ``[N, C]``
  multi-hot) and boolean train/val/test masks, and refuses inconsistent input
  with a message that says what is wrong.
- :func:`metis_clusters` partitions a graph with METIS through ``pymetis`` (no
  compiled PyG extension): the graph is symmetrised, self loops and duplicate
  edges dropped; isolated nodes and disconnected graphs are fine. Results are
  cached on disk, keyed by the graph's content hash, the part count and the
  seed.
- :class:`ClusterBatches` yields Cluster-GCN mini-batches: each epoch the
  clusters are shuffled and taken ``q`` at a time; a batch is the subgraph
  induced by the union of its clusters, nodes relabelled ``0..n-1``.
- :func:`sbm` draws a stochastic block model with class-correlated features,
  vectorised, so million-edge graphs take about a second.
- :func:`evaluate_nodes` scores a model on the full graph: accuracy and
  micro-F1 (multi-label aware).
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from istfx.errors import ISTError
from istfx.runtime.data import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX", "ClusterBatches", "Graph", "GraphError", "Partition", "cache_dir", "evaluate_nodes",
    "mask_from_index", "masked_targets", "metis_clusters", "micro_f1", "node_loss", "sbm",
]



class GraphError(ISTError):
    """Inconsistent graph data: out-of-range edges, mismatched lengths, impossible cluster counts."""


# -- the graph ------------------------------------------------------------------------------------
def _check_edge_index(edge_index: Any, num_nodes: int, what: str = "edge_index") -> torch.Tensor:
    """`edge_index` as a ``[2, E]`` int64 tensor whose entries are node ids in ``[0, num_nodes)``."""
    if not isinstance(edge_index, torch.Tensor):
        edge_index = torch.as_tensor(np.asarray(edge_index))
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise GraphError(f"{what} must hold integer node ids, got dtype {edge_index.dtype}.")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        hint = " (it looks transposed: pass edge_index.t())" if edge_index.dim() == 2 and edge_index.shape[1] == 2 \
            else ""
        raise GraphError(f"{what} must have shape [2, num_edges], got {list(edge_index.shape)}{hint}.")
    edge_index = edge_index.to(torch.int64)
    if edge_index.numel():
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            bad = low if low < 0 else high
            column = int((edge_index == bad).any(dim=0).nonzero()[0])
            raise GraphError(
                f"{what} refers to node {bad} (column {column}) but the graph has {num_nodes} nodes, ids "
                f"0..{num_nodes - 1}: drop or renumber the edges, or give the features of every node."
            )
    return edge_index


def mask_from_index(index: Any, num_nodes: int, what: str = "index") -> torch.Tensor:
    """A boolean mask of length `num_nodes`, True at the node ids in `index`."""
    index = torch.as_tensor(np.asarray(index)).reshape(-1).to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_nodes):
        raise GraphError(f"{what} holds node ids outside 0..{num_nodes - 1} "
                         f"(min {int(index.min())}, max {int(index.max())}).")
    mask = torch.zeros(num_nodes, dtype=torch.bool)
    mask[index] = True
    return mask


@dataclass(eq=False)
class Graph:
    """A node-classification graph, validated on construction.

    Attributes:
        x: node features ``[num_nodes, num_features]`` (floating point).
        edge_index: ``[2, num_edges]`` integer node ids, row 0 the source,
            row 1 the target (messages flow source -> target). Give both
            directions for an undirected graph.
        y: ``[num_nodes]`` int64 class ids, or ``[num_nodes, num_classes]``
            multi-hot labels (0/1, any dtype; kept as float32).
        train_mask, val_mask, test_mask: ``[num_nodes]`` booleans (or None).
        name: shown in messages and reports.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor | None = None
    train_mask: torch.Tensor | None = None
    val_mask: torch.Tensor | None = None
    test_mask: torch.Tensor | None = None
    name: str = "graph"

    def __post_init__(self) -> None:
        x = self.x if isinstance(self.x, torch.Tensor) else torch.as_tensor(np.asarray(self.x))
        if x.dim() != 2:
            raise GraphError(f"{self.name}: x must be [num_nodes, num_features], got shape {list(x.shape)}.")
        if not x.is_floating_point():
            x = x.to(torch.float32)
        self.x = x
        n = x.shape[0]
        if n == 0:
            raise GraphError(f"{self.name}: the graph has no nodes (x has 0 rows).")
        self.edge_index = _check_edge_index(self.edge_index, n)
        if self.y is not None:
            y = self.y if isinstance(self.y, torch.Tensor) else torch.as_tensor(np.asarray(self.y))
            if y.dim() == 0 or y.shape[0] != n:
                raise GraphError(f"{self.name}: y has {y.shape[0] if y.dim() else 0} labels but x has {n} rows "
                                 "(one label per node): features and labels must describe the same nodes.")
            if y.dim() == 1:
                if y.is_floating_point() or y.dtype == torch.bool:
                    raise GraphError(f"{self.name}: 1-D labels must be integer class ids, got {y.dtype}.")
                y = y.to(torch.int64)
                if int(y.min()) < 0:
                    raise GraphError(f"{self.name}: class ids must be >= 0, got {int(y.min())}.")
            elif y.dim() == 2:
                y = y.to(torch.float32)
                if not bool(((y == 0) | (y == 1)).all()):
                    raise GraphError(f"{self.name}: 2-D labels must be multi-hot (0/1 entries).")
            else:
                raise GraphError(f"{self.name}: y must be [num_nodes] or [num_nodes, num_classes], "
                                 f"got shape {list(y.shape)}.")
            self.y = y
        for field in ("train_mask", "val_mask", "test_mask"):
            mask = getattr(self, field)
            if mask is None:
                continue
            mask = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
            if mask.dtype != torch.bool:
                raise GraphError(f"{self.name}: {field} must be a boolean mask (use graphs.mask_from_index "
                                 f"for a list of node ids), got dtype {mask.dtype}.")
            if mask.shape != (n,):
                raise GraphError(f"{self.name}: {field} has shape {list(mask.shape)} but the graph has {n} nodes "
                                 f"(x has {n} rows): one entry per node.")
            setattr(self, field, mask)

    @property
    def num_nodes(self) -> int:
        """Nodes (rows of ``x``)."""
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        """Directed edges (columns of ``edge_index``)."""
        return int(self.edge_index.shape[1])

    @property
    def num_features(self) -> int:
        """Features per node."""
        return int(self.x.shape[1])

    @property
    def multilabel(self) -> bool:
        """True when the labels are multi-hot ``[N, C]``."""
        return self.y is not None and self.y.dim() == 2

    @property
    def num_classes(self) -> int:
        """Classes (one more than the largest class id, or the multi-hot width)."""
        if self.y is None:
            raise GraphError(f"{self.name} has no labels.")
        return int(self.y.shape[1]) if self.multilabel else int(self.y.max()) + 1

    def mask(self, which: str | torch.Tensor | None) -> torch.Tensor:
        """The boolean mask named ``"train"``/``"val"``/``"test"``, a given mask, or all nodes for None."""
        if which is None:
            return torch.ones(self.num_nodes, dtype=torch.bool)
        if isinstance(which, torch.Tensor):
            if which.dtype != torch.bool:
                return mask_from_index(which, self.num_nodes, "mask")
            if which.shape != (self.num_nodes,):
                raise GraphError(f"{self.name}: a mask needs {self.num_nodes} entries, got {list(which.shape)}.")
            return which
        names = {"train": self.train_mask, "val": self.val_mask, "valid": self.val_mask, "test": self.test_mask}
        if which not in names:
            raise GraphError(f"unknown mask {which!r}: use 'train', 'val', 'test', a boolean tensor or None.")
        mask = names[which]
        if mask is None:
            raise GraphError(f"{self.name} has no {which} mask: pass {which}_mask= to Graph(...).")
        return mask

    def standardized(self) -> Graph:
        """A copy with features standardised by the training nodes' mean and std (all nodes without a mask)."""
        rows = self.x[self.train_mask] if self.train_mask is not None and bool(self.train_mask.any()) else self.x
        mean, std = rows.mean(0), rows.std(0) if rows.shape[0] > 1 else torch.ones(self.num_features)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return Graph((self.x - mean) / std, self.edge_index, self.y, self.train_mask, self.val_mask,
                     self.test_mask, self.name)

    def __repr__(self) -> str:
        labels = "none" if self.y is None else (f"{self.num_classes} labels (multi-hot)" if self.multilabel
                                                else f"{self.num_classes} classes")
        splits = ", ".join(f"{k} {int(m.sum())}" for k, m in
                           (("train", self.train_mask), ("val", self.val_mask), ("test", self.test_mask))
                           if m is not None)
        return (f"Graph({self.name}: {self.num_nodes:,} nodes, {self.num_edges:,} edges, "
                f"{self.num_features} features, {labels}{', ' + splits if splits else ''})")


# -- METIS ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where partitions are cached: ``$ISTFX_CACHE/metis``, else ``~/.cache/istfx/metis``."""
    root = os.environ.get("ISTFX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "istfx")
    return Path(root) / "metis"


def _structure_digest(edge_index: torch.Tensor, num_nodes: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.int64(num_nodes).tobytes())
    h.update(np.ascontiguousarray(edge_index.numpy()).tobytes())
    return h.hexdigest()


def _symmetric_csr(edge_index: torch.Tensor, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (xadj, adjncy) of the undirected simple graph: both directions, no self loops, no duplicates."""
    src = edge_index[0].numpy()
    dst = edge_index[1].numpy()
    keep = src != dst
    src, dst = src[keep], dst[keep]
    key = np.concatenate([src * num_nodes + dst, dst * num_nodes + src])
    key = np.unique(key)  # sorted by source, then target
    rows = key // num_nodes
    adjncy = key - rows * num_nodes
    xadj = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_nodes), out=xadj[1:])
    return xadj, adjncy


def _fill_empty(cluster: np.ndarray, parts: int) -> np.ndarray:
    """Give every empty cluster one node taken from the largest cluster (METIS may leave parts empty)."""
    sizes = np.bincount(cluster, minlength=parts)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        node = int(np.flatnonzero(cluster == donor)[-1])
        cluster[node] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return cluster


def _metis(edge_index: torch.Tensor, num_nodes: int, parts: int, seed: int) -> np.ndarray:
    try:
        import pymetis
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('istfx.graph.graphs needs pymetis for METIS clusters: pip install "istfx[graph]"') from exc
    if parts == 1:
        return np.zeros(num_nodes, dtype=np.int64)
    xadj, adjncy = _symmetric_csr(edge_index, num_nodes)
    options = pymetis.Options(seed=int(seed))
    adjacency = pymetis.CSRAdjacency(adj_starts=xadj, adjacent=adjncy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = pymetis.part_graph(parts, adjacency=adjacency, options=options)
    cluster = np.asarray(result[1], dtype=np.int64)
    return _fill_empty(cluster, parts)


def metis_clusters(
    edge_index: torch.Tensor,
    num_nodes: int,
    parts: int,
    seed: int = 0,
    cache: bool | str | os.PathLike = True,
) -> torch.Tensor:
    """METIS cluster id of every node: a ``[num_nodes]`` int64 tensor with values in ``[0, parts)``.

    The graph is made undirected (both directions), self loops and duplicate
    edges are dropped; isolated nodes and disconnected graphs are fine.
    Every cluster gets at least one node (a cluster METIS leaves empty takes
    one node from the largest). The same graph, part count and seed give the
    same clusters.

    Args:
        edge_index: ``[2, E]`` node ids in ``[0, num_nodes)``.
        num_nodes: nodes of the graph (ids without edges are isolated nodes).
        parts: clusters, between 1 and `num_nodes`.
        seed: METIS's random seed.
        cache: True caches under :func:`cache_dir`, a path caches there,
            False computes every time. Entries are keyed by a hash of the
            graph's edges and node count, `parts` and `seed`.
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
        raise GraphError(f"num_nodes must be a positive int, got {num_nodes!r}.")
    if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 1:
        raise GraphError(f"parts must be an int >= 1, got {parts!r}.")
    num_nodes, parts = int(num_nodes), int(parts)
    if parts > num_nodes:
        raise GraphError(f"parts={parts} clusters but the graph has only {num_nodes} nodes: every cluster needs at "
                         f"least one node, so use parts <= {num_nodes}.")
    edge_index = _check_edge_index(edge_index, num_nodes)
    path = None
    if cache is not False:
        folder = cache_dir() if cache is True else Path(cache)
        path = folder / f"metis-{_structure_digest(edge_index, num_nodes)}-n{num_nodes}-p{parts}-s{int(seed)}.npy"
        if path.exists():
            try:
                cluster = np.load(path)
            except (OSError, ValueError):
                cluster = None  # a damaged entry is recomputed and replaced
            if cluster is not None and cluster.shape == (num_nodes,) and cluster.size and \
                    0 <= cluster.min() and cluster.max() < parts:
                return torch.from_numpy(cluster.astype(np.int64))
    cluster = _metis(edge_index, num_nodes, parts, int(seed))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metis-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, cluster)
            os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return torch.from_numpy(cluster)


# -- Cluster-GCN batches -------------------------------------------------------------------------------
def _ranges(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(starts[i], ends[i])`` over i, without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    offsets = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return offsets + torch.arange(total, dtype=torch.int64)


def masked_targets(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Labels with the nodes outside `keep` set to :data:`IGNORE_INDEX` (rows of it when multi-hot)."""
    out = y.clone()
    out[~keep] = IGNORE_INDEX
    return out


class Partition:
    """A graph cut into clusters, indexed for fast induced subgraphs.

    Nodes are sorted by cluster (``perm``, with boundaries ``ptr``) and edges
    by the cluster of their source, so the edges leaving a cluster are one
    contiguous range; a batch gathers its clusters' ranges and keeps the
    edges whose target lies in the batch.

    Args:
        graph: the graph.
        cluster: ``[num_nodes]`` cluster ids, e.g. from :func:`metis_clusters`.
    """

    def __init__(self, graph: Graph, cluster: torch.Tensor) -> None:
        cluster = torch.as_tensor(cluster).to(torch.int64).reshape(-1)
        if cluster.shape[0] != graph.num_nodes:
            raise GraphError(f"cluster has {cluster.shape[0]} entries but {graph.name} has {graph.num_nodes} nodes.")
        if cluster.numel() and int(cluster.min()) < 0:
            raise GraphError("cluster ids must be >= 0.")
        self.graph = graph
        self.cluster = cluster
        self.parts = int(cluster.max()) + 1
        sizes = torch.bincount(cluster, minlength=self.parts)
        if bool((sizes == 0).any()):
            empty = torch.nonzero(sizes == 0).reshape(-1)[:5].tolist()
            raise GraphError(f"clusters {empty} hold no nodes: number clusters 0..k-1 with no gaps.")
        self.sizes = sizes
        self.perm = torch.argsort(cluster, stable=True)
        self.ptr = torch.zeros(self.parts + 1, dtype=torch.int64)
        self.ptr[1:] = torch.cumsum(sizes, 0)
        self.position = torch.empty_like(self.perm)  # a node's rank inside its cluster
        self.position[self.perm] = torch.arange(graph.num_nodes) - self.ptr[cluster[self.perm]]
        src_cluster = cluster[graph.edge_index[0]]
        self.edge_order = torch.argsort(src_cluster, stable=True)
        self.edge_ptr = torch.zeros(self.parts + 1, dtype=torch.int64)
        self.edge_ptr[1:] = torch.cumsum(torch.bincount(src_cluster, minlength=self.parts), 0)

    @classmethod
    def metis(cls, graph: Graph, parts: int, seed: int = 0, cache: bool | str | os.PathLike = True) -> Partition:
        """METIS clusters of `graph` (see :func:`metis_clusters`), indexed."""
        return cls(graph, metis_clusters(graph.edge_index, graph.num_nodes, parts, seed, cache))

    def subgraph(self, clusters: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The subgraph induced by the union of `clusters`.

        Returns ``(nodes, edge_index)``: the global ids of its nodes (cluster by
        cluster, in the order given) and its edges relabelled to positions in
        ``nodes``. An edge is kept when both ends lie in the union.
        """
        clusters = torch.as_tensor(clusters, dtype=torch.int64).reshape(-1)
        if clusters.numel() == 0:
            raise GraphError("a batch needs at least one cluster.")
        if int(clusters.min()) < 0 or int(clusters.max()) >= self.parts:
            raise GraphError(f"cluster ids must lie in 0..{self.parts - 1}.")
        if torch.unique(clusters).numel() != clusters.numel():
            raise GraphError("a batch lists a cluster twice.")
        nodes = self.perm[_ranges(self.ptr[clusters], self.ptr[clusters + 1])]
        offset = torch.full((self.parts,), -1, dtype=torch.int64)  # where each chosen cluster starts in the batch
        offset[clusters] = torch.cumsum(self.sizes[clusters], 0) - self.sizes[clusters]
        edges = self.edge_order[_ranges(self.edge_ptr[clusters], self.edge_ptr[clusters + 1])]
        src, dst = self.graph.edge_index[0, edges], self.graph.edge_index[1, edges]
        inside = offset[self.cluster[dst]] >= 0
        src, dst = src[inside], dst[inside]
        local = torch.stack([offset[self.cluster[src]] + self.position[src],
                             offset[self.cluster[dst]] + self.position[dst]])
        return nodes, local


class ClusterBatches:
    """Cluster-GCN mini-batches over a :class:`Partition`, one pass per iteration.

    Each pass shuffles the clusters (a generator seeded by ``(seed, pass)``)
    and takes them `clusters_per_batch` at a time; a batch is
    ``((x, edge_index), targets)`` for the subgraph induced by their union,
    where ``targets`` are the labels of the nodes in `label_mask` and
    :data:`IGNORE_INDEX` elsewhere. Batches whose nodes carry no label are
    skipped. The sequence depends only on the arguments and the pass number,
    so any process reproduces it.

    Args:
        partition: the clustered graph.
        clusters_per_batch: q, clusters per batch (the last batch of a pass
            may hold fewer).
        seed: seeds the shuffles.
        clusters: the cluster ids to draw from (default: all).
        label_mask: nodes whose labels are trained on (default: the train mask).
    """

    def __init__(
        self,
        partition: Partition,
        clusters_per_batch: int = 1,
        seed: int = 0,
        clusters: Sequence[int] | torch.Tensor | None = None,
        label_mask: str | torch.Tensor | None = "train",
    ) -> None:
        graph = partition.graph
        if graph.y is None:
            raise GraphError(f"{graph.name} has no labels to train on.")
        if isinstance(clusters_per_batch, bool) or not isinstance(clusters_per_batch, int) or clusters_per_batch < 1:
            raise GraphError(f"clusters_per_batch must be an int >= 1, got {clusters_per_batch!r}.")
        self.partition = partition
        self.clusters = (torch.arange(partition.parts) if clusters is None
                         else torch.as_tensor(clusters, dtype=torch.int64).reshape(-1))
        if self.clusters.numel() == 0:
            raise GraphError("no clusters to draw batches from.")
        self.q = min(clusters_per_batch, self.clusters.numel())
        self.seed = int(seed)
        self.keep = graph.mask(label_mask)
        labelled = torch.zeros(partition.parts, dtype=torch.bool)
        labelled[partition.cluster[self.keep]] = True
        self.labelled = labelled  # clusters holding at least one labelled node
        if not bool(labelled[self.clusters].any()):
            raise GraphError("none of the clusters holds a labelled node: nothing to train on "
                             "(check the train mask).")
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.clusters.numel() / self.q)

    def batch(self, clusters: Sequence[int] | torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The batch ``((x, edge_index), targets)`` of the given clusters."""
        graph = self.partition.graph
        nodes, edge_index = self.partition.subgraph(clusters)
        return (graph.x[nodes], edge_index), masked_targets(graph.y[nodes], self.keep[nodes])

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = self.clusters[torch.randperm(self.clusters.numel(), generator=generator)]
        for k in range(len(self)):
            chosen = order[k * self.q:(k + 1) * self.q]
            if bool(self.labelled[chosen].any()):  # else nothing to learn from this batch
                yield self.batch(chosen)


# -- a stochastic block model -----------------------------------------------------------------------------
def sbm(
    num_nodes: int,
    num_classes: int,
    *,
    avg_degree: float = 10.0,
    homophily: float = 0.8,
    num_features: int = 32,
    feature_signal: float = 1.0,
    isolated: float = 0.0,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    name: str | None = None,
) -> Graph:
    """A stochastic block model with class-correlated features (vectorised; ~1 s per million edges).

    Blocks are the classes (assigned uniformly at random). Each of the
    ``num_nodes * avg_degree / 2`` undirected edges picks a uniform source;
    with probability `homophily` its target is a uniform node of the
    source's block, otherwise a uniform node of the graph. Self loops and
    duplicates are dropped and both directions kept, so ``num_edges`` is
    about ``num_nodes * avg_degree``. Features are
    ``feature_signal * mean[class] + N(0, 1)`` with class means drawn from
    ``N(0, I / num_features)`` scaled to unit norm: a low `feature_signal`
    makes the features alone weak evidence, so the graph has to help.

    Args:
        isolated: share of nodes whose edges are removed (isolated nodes).
        split: train/val/test shares of the nodes (random, seeded).
    """
    if num_nodes < 1 or num_classes < 1 or num_features < 1:
        raise GraphError("num_nodes, num_classes and num_features must be >= 1.")
    if num_classes > num_nodes:
        raise GraphError(f"{num_classes} classes need at least as many nodes, got {num_nodes}.")
    if not 0.0 <= homophily <= 1.0 or not 0.0 <= isolated < 1.0 or avg_degree < 0:
        raise GraphError("homophily must lie in [0, 1], isolated in [0, 1) and avg_degree be >= 0.")
    if len(split) != 3 or min(split) < 0 or sum(split) > 1.0 + 1e-9:
        raise GraphError(f"split must be three non-negative shares summing to at most 1, got {split}.")
    rng = np.random.default_rng(seed)
    n = int(num_nodes)
    y = rng.integers(0, num_classes, n)
    y[:num_classes] = np.arange(num_classes)  # every class present
    rng.shuffle(y)
    by_class = np.argsort(y, kind="stable")
    class_ptr = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(np.bincount(y, minlength=num_classes), out=class_ptr[1:])

    m = int(round(n * avg_degree / 2))
    src = rng.integers(0, n, m)
    within = rng.random(m) < homophily
    block = y[src]
    start, size = class_ptr[block], class_ptr[block + 1] - class_ptr[block]
    same = by_class[start + (rng.random(m) * size).astype(np.int64)]
    dst = np.where(within, same, rng.integers(0, n, m))
    if isolated > 0:
        lonely = rng.random(n) < isolated
        keep = ~(lonely[src] | lonely[dst])
        src, dst = src[keep], dst[keep]
    keep = src != dst
    key = np.unique(np.concatenate([src[keep] * n + dst[keep], dst[keep] * n + src[keep]]))
    edge_index = np.stack([key // n, key % n])

    means = rng.standard_normal((num_classes, num_features))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = (feature_signal * means[y] + rng.standard_normal((n, num_features))).astype(np.float32)

    order = rng.permutation(n)
    n_train, n_val = int(split[0] * n), int(split[1] * n)
    n_test = min(int(split[2] * n), n - n_train - n_val)
    masks = [np.zeros(n, dtype=bool) for _ in range(3)]
    masks[0][order[:n_train]] = True
    masks[1][order[n_train:n_train + n_val]] = True
    masks[2][order[n_train + n_val:n_train + n_val + n_test]] = True
    return Graph(torch.from_numpy(x), torch.from_numpy(edge_index), torch.from_numpy(y),
                 *(torch.from_numpy(mk) for mk in masks),
                 name=name or f"sbm-{n}-{num_classes}c-d{avg_degree:g}-h{homophily:g}-s{seed}")


# -- loss and evaluation -------------------------------------------------------------------------------
def node_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss over the labelled nodes of a batch.

    ``targets [N]`` class ids: cross-entropy, nodes equal to IGNORE_INDEX left
    out. ``targets [N, C]`` multi-hot: binary cross-entropy with logits over
    the rows not filled with IGNORE_INDEX. A batch without labelled nodes
    gives a zero loss (and zero gradients), not NaN.
    """
    if targets.dim() == 1:
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            return outputs.sum() * 0.0
        return F.cross_entropy(outputs[keep], targets[keep])
    keep = (targets != IGNORE_INDEX).all(dim=1)
    if not bool(keep.any()):
        return outputs.sum() * 0.0
    return F.binary_cross_entropy_with_logits(outputs[keep], targets[keep].to(outputs.dtype))


def micro_f1(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy and micro-F1 of `logits` against `targets` (rows equal to IGNORE_INDEX are skipped).

    Single-label (``targets [N]`` class ids): prediction is the argmax and
    micro-F1 equals accuracy. Multi-label (``targets [N, C]`` multi-hot):
    label j is predicted when ``logits[:, j] > 0``; micro-F1 pools true/false
    positives and false negatives over all labels, accuracy is the share of
    nodes whose whole label set is right.
    """
    if targets.dim() == 1:
        keep = targets != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:
            raise GraphError("no labelled nodes to score.")
        correct = int((logits[keep].argmax(1) == targets[keep]).sum())
        return {"accuracy": correct / n, "micro_f1": correct / n, "nodes": n}
    keep = (targets != IGNORE_INDEX).all(dim=1)
    n = int(keep.sum())
    if n == 0:
        raise GraphError("no labelled nodes to score.")
    pred, true = logits[keep] > 0, targets[keep] > 0.5
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    exact = int((pred == true).all(dim=1).sum())
    return {"accuracy": exact / n, "micro_f1": f1, "nodes": n}


def evaluate_nodes(model: nn.Module, graph: Graph, mask: str | torch.Tensor | None = "test") -> dict[str, float]:
    """Accuracy, micro-F1 and loss of `model` on the nodes of `mask`, from one pass over the full graph.

    The model runs in eval mode without gradients (its mode is restored).
    Returns ``{"accuracy", "micro_f1", "loss", "nodes"}``.
    """
    if graph.y is None:
        raise GraphError(f"{graph.name} has no labels to evaluate against.")
    keep = graph.mask(mask)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(graph.x, graph.edge_index)
    finally:
        model.train(was_training)
    targets = masked_targets(graph.y, keep)
    scores = micro_f1(logits, targets)
    scores["loss"] = float(node_loss(logits, targets))
    return scores
