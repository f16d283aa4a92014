"""Loaders for GIST's large graphs, reading the files where their publishers' formats put them.

Nothing is downloaded: each loader reads files you placed yourself and, when
they are missing, says which files go where.

Usage::

    from istfx.graph import datasets

    graph = graph_datasets.reddit("data/reddit")              # reddit_data.npz + reddit_graph.npz
    graph = graph_datasets.ogbn_products("data/ogbn_products")  # raw/*.csv.gz + split/sales_ranking/
    graph = graph_datasets.amazon2m("data/amazon2M")           # amazon2M-{G.json,feats.npy,id_map.json,class_map.json}
    graph = graph_datasets.load("reddit", "data/reddit")

- **Reddit** (232,965 nodes, 114.6M edges, 602 features, 41 classes): PyG's
  raw format, ``reddit_data.npz`` (``feature``, ``label``, ``node_types``:
  1 train, 2 val, 3 test) and ``reddit_graph.npz`` (a SciPy sparse
  adjacency saved with ``scipy.sparse.save_npz``, COO or CSR), in `root` or
  ``root/raw``. They are the two files of ``reddit.zip`` from
  https://data.dgl.ai/dataset/reddit.zip.
- **Amazon2M** (2.45M nodes, 61.9M edges, 100 features, 47 classes): the
  format of the Cluster-GCN release, GraphSAGE's
  ``amazon2M-G.json`` (networkx node-link data; nodes carry ``val``/``test``
  flags, every other node trains), ``amazon2M-feats.npy``,
  ``amazon2M-id_map.json`` (node id -> row) and ``amazon2M-class_map.json``
  (node id -> class id, or a multi-hot list), in `root`. The same
  co-purchase graph is distributed today as OGB's ``ogbn-products``
  (:func:`ogbn_products`), which is the common form and far quicker to read;
  the JSON graph needs tens of GB of memory for the full Amazon2M.
- **ogbn-products** (2,449,029 nodes, 61,859,140 undirected edges, 100
  features, 47 classes): OGB's raw layout, ``raw/edge.csv.gz`` (one
  ``src,dst`` per line, each undirected edge once: both directions are
  returned), ``raw/node-feat.csv.gz``, ``raw/node-label.csv.gz`` and
  ``split/sales_ranking/{train,valid,test}.csv.gz`` (node ids), in `root`
  or ``root/ogbn_products``: the unzipped ``products.zip`` from
  http://snap.stanford.edu/ogb/data/nodeproppred/products.zip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from istfx.graph.graphs import Graph, GraphError, mask_from_index

__all__ = ["amazon2m", "load", "ogbn_products", "reddit"]


def _find(root: str | os.PathLike, names: list[str], subdirs: list[str], dataset: str, how: str) -> Path:
    """The first folder among `root`/`subdirs` holding every file of `names`; a clear error otherwise."""
    root = Path(root)
    for sub in subdirs:
        folder = root / sub if sub else root
        if all((folder / n).is_file() for n in names):
            return folder
    searched = ", ".join(str(root / s) if s else str(root) for s in subdirs)
    raise GraphError(f"{dataset}: {', '.join(names)} not found in {searched}. {how}")


# -- Reddit -----------------------------------------------------------------------------------------------
_REDDIT_HOW = ("Put PyG's raw Reddit files there: reddit_data.npz and reddit_graph.npz (the contents of "
               "https://data.dgl.ai/dataset/reddit.zip); istfx does not download them.")


def _sparse_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(row, col, shape) of a matrix saved by ``scipy.sparse.save_npz`` (COO, CSR or CSC), read with NumPy."""
    with np.load(path, allow_pickle=False) as f:
        fmt = f["format"].item()
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        shape = tuple(int(s) for s in f["shape"])
        if fmt == "coo":
            return f["row"].astype(np.int64), f["col"].astype(np.int64), shape
        if fmt in ("csr", "csc"):
            indptr, indices = f["indptr"].astype(np.int64), f["indices"].astype(np.int64)
            major = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
            return (major, indices, shape) if fmt == "csr" else (indices, major, shape)
    raise GraphError(f"{path}: sparse format {fmt!r} is not supported (expected coo, csr or csc).")


def reddit(root: str | os.PathLike) -> Graph:
    """Reddit from PyG's raw files ``reddit_data.npz`` and ``reddit_graph.npz`` in `root` or ``root/raw``.

    Edges are the adjacency's nonzeros, sorted and without duplicates (as
    PyG's ``coalesce``); masks come from ``node_types`` (1/2/3).
    """
    folder = _find(root, ["reddit_data.npz", "reddit_graph.npz"], ["", "raw"], "Reddit", _REDDIT_HOW)
    with np.load(folder / "reddit_data.npz", allow_pickle=False) as data:
        x = torch.from_numpy(np.asarray(data["feature"], dtype=np.float32))
        y = torch.from_numpy(np.asarray(data["label"]).astype(np.int64).reshape(-1))
        split = np.asarray(data["node_types"]).reshape(-1)
    row, col, shape = _sparse_npz(folder / "reddit_graph.npz")
    n = x.shape[0]
    if shape[0] != n or shape[1] != n:
        raise GraphError(f"Reddit: reddit_graph.npz is {shape[0]}x{shape[1]} but reddit_data.npz has {n} nodes.")
    key = np.unique(row * n + col)
    edge_index = torch.from_numpy(np.stack([key // n, key % n]))
    masks = [torch.from_numpy(split == k) for k in (1, 2, 3)]
    return Graph(x, edge_index, y, *masks, name="reddit")


# -- ogbn-products ------------------------------------------------------------------------------------------
_OGB_HOW = ("Put OGB's unzipped products.zip there (raw/edge.csv.gz, raw/node-feat.csv.gz, raw/node-label.csv.gz, "
            "split/sales_ranking/{train,valid,test}.csv.gz), from "
            "http://snap.stanford.edu/ogb/data/nodeproppred/products.zip; istfx does not download it.")


def _csv(path: Path, dtype: Any) -> np.ndarray:
    """A headerless comma-separated file (gzip when the name ends in .gz) as a 2-D array."""
    return np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)


def ogbn_products(root: str | os.PathLike) -> Graph:
    """ogbn-products from OGB's raw files (``raw/`` and ``split/sales_ranking/``) in `root` or ``root/ogbn_products``.

    The raw edge list holds each undirected edge once; both directions are
    returned, as OGB does for this dataset.
    """
    raw = ["raw/edge.csv.gz", "raw/node-feat.csv.gz", "raw/node-label.csv.gz"]
    splits = [f"split/sales_ranking/{s}.csv.gz" for s in ("train", "valid", "test")]
    folder = _find(root, raw + splits, ["", "ogbn_products"], "ogbn-products", _OGB_HOW)
    x = torch.from_numpy(_csv(folder / raw[1], np.float32))
    n = x.shape[0]
    labels = _csv(folder / raw[2], np.float64).reshape(-1)
    if labels.shape[0] != n:
        raise GraphError(f"ogbn-products: node-label.csv.gz has {labels.shape[0]} rows, node-feat.csv.gz {n}.")
    if np.isnan(labels).any():
        raise GraphError("ogbn-products: node-label.csv.gz has missing labels.")
    y = torch.from_numpy(labels.astype(np.int64))
    edges = _csv(folder / raw[0], np.int64)
    if edges.size and edges.shape[1] != 2:
        raise GraphError(f"ogbn-products: edge.csv.gz must hold two columns (src,dst), got {edges.shape[1]}.")
    edges = edges.reshape(-1, 2).T
    edge_index = torch.from_numpy(np.concatenate([edges, edges[::-1]], axis=1).copy())
    masks = [mask_from_index(_csv(folder / s, np.int64).reshape(-1), n, s) for s in splits]
    return Graph(x, edge_index, y, *masks, name="ogbn-products")


# -- Amazon2M (Cluster-GCN / GraphSAGE format) -----------------------------------------------------------------
def _amazon_how(prefix: str) -> str:
    return (f"Put the Cluster-GCN release there: {prefix}-G.json, {prefix}-feats.npy, {prefix}-id_map.json and "
            f"{prefix}-class_map.json; or load the same graph as OGB's ogbn-products with "
            "graph_datasets.ogbn_products (istfx does not download either).")


def amazon2m(root: str | os.PathLike, prefix: str = "amazon2M") -> Graph:
    """Amazon2M in the Cluster-GCN (GraphSAGE) format: ``{prefix}-G.json``, ``-feats.npy``, ``-id_map.json``,
    ``-class_map.json`` in `root` or ``root/{prefix}``.

    Node ``i`` is the node that ``id_map`` sends to row ``i``; nodes of the
    graph without an ``id_map`` entry are dropped (as Cluster-GCN does).
    Links name their ends by node id (networkx >= 2) or by position in the
    node list (networkx 1.x); both are read. Every link is returned in both
    directions. Nodes flagged ``val`` or ``test`` form those splits; the
    others train. A ``class_map`` of lists gives multi-hot labels.
    """
    names = [f"{prefix}-{s}" for s in ("G.json", "feats.npy", "id_map.json", "class_map.json")]
    folder = _find(root, names, ["", prefix], "Amazon2M", _amazon_how(prefix))
    with open(folder / names[0], encoding="utf-8") as f:
        graph_json = json.load(f)
    with open(folder / names[2], encoding="utf-8") as f:
        id_map = {str(k): int(v) for k, v in json.load(f).items()}
    with open(folder / names[3], encoding="utf-8") as f:
        class_map = {str(k): v for k, v in json.load(f).items()}
    x = torch.from_numpy(np.load(folder / names[1]).astype(np.float32))
    n = len(id_map)
    if sorted(id_map.values()) != list(range(n)):
        raise GraphError(f"Amazon2M: {names[2]} must map the node ids onto rows 0..{n - 1}, each once.")
    if x.shape[0] != n:
        raise GraphError(f"Amazon2M: {names[1]} has {x.shape[0]} rows but {names[2]} maps {n} nodes.")

    nodes = graph_json.get("nodes", [])
    links = graph_json.get("links", graph_json.get("edges", []))
    ids = [str(node["id"]) for node in nodes]
    by_id = all(str(link["source"]) in id_map and str(link["target"]) in id_map for link in links) \
        if links else True
    if by_id:
        ends = [(str(link["source"]), str(link["target"])) for link in links]
    else:  # networkx 1.x: positions in the node list
        ends = [(ids[link["source"]], ids[link["target"]]) for link in links]
    pairs = np.array([(id_map[a], id_map[b]) for a, b in ends if a in id_map and b in id_map],
                     dtype=np.int64).reshape(-1, 2).T
    edge_index = torch.from_numpy(np.concatenate([pairs, pairs[::-1]], axis=1).copy())

    val = np.zeros(n, dtype=bool)
    test = np.zeros(n, dtype=bool)
    for node, key in zip(nodes, ids):
        row = id_map.get(key)
        if row is not None:
            val[row] = bool(node.get("val", False))
            test[row] = bool(node.get("test", False))
    train = ~(val | test)

    missing = [k for k in id_map if k not in class_map]
    if missing:
        raise GraphError(f"Amazon2M: {len(missing)} nodes have no entry in {names[3]} (e.g. {missing[0]!r}).")
    first = next(iter(class_map.values()))
    if isinstance(first, list):
        y = np.zeros((n, len(first)), dtype=np.float32)
        for key, row in id_map.items():
            y[row] = class_map[key]
    else:
        y = np.zeros(n, dtype=np.int64)
        for key, row in id_map.items():
            y[row] = int(class_map[key])
    return Graph(x, edge_index, torch.from_numpy(y), torch.from_numpy(train), torch.from_numpy(val),
                 torch.from_numpy(test), name="amazon2M")


_LOADERS = {"reddit": reddit, "ogbn-products": ogbn_products, "ogbn_products": ogbn_products,
            "products": ogbn_products, "amazon2m": amazon2m}


def load(name: str, root: str | os.PathLike) -> Graph:
    """Load dataset `name` (``reddit``, ``ogbn-products`` or ``amazon2m``) from the files in `root`."""
    key = name.strip().lower()
    if key not in _LOADERS:
        raise GraphError(f"unknown graph dataset {name!r}: use 'reddit', 'ogbn-products' or 'amazon2m'.")
    return _LOADERS[key](root)
