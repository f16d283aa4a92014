"""Graphs for GIST: validation, METIS clusters, Cluster-GCN batches, the SBM generator, scores, loaders.

- METIS: every node in exactly one of exactly `parts` non-empty clusters,
  deterministic, cached on disk (a cache hit runs no METIS), isolated nodes
  and disconnected graphs included;
- batches: the subgraph of a set of clusters is exactly the induced
  subgraph, relabelled in range; one pass visits every cluster once;
- bad input: each error names the problem;
- the SBM generator: sizes, symmetry, homophily, a million-edge graph;
- micro-F1 against scikit-learn, single- and multi-label;
- loaders on tiny files written in each dataset's own format.
"""
from __future__ import annotations

import gzip
import json

import numpy as np
import pymetis  # noqa: F401  (the test extra: METIS clusters)
import pytest
import scipy.sparse as sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from istfx.graph import datasets as graph_datasets, graphs
from istfx.graph.graphs import IGNORE_INDEX, ClusterBatches, Graph, GraphError, Partition, metis_clusters


@st.composite
def random_graphs(draw, max_nodes: int = 40):
    """Edge lists with self loops, duplicates, isolated nodes and several components."""
    n = draw(st.integers(1, max_nodes))
    m = draw(st.integers(0, 3 * n))
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), min_size=m, max_size=m))
    edge_index = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).t().contiguous()
    return n, edge_index


def _graph(n: int, edge_index: torch.Tensor, classes: int = 3, seed: int = 0) -> Graph:
    gen = torch.Generator().manual_seed(seed)
    train = torch.rand(n, generator=gen) < 0.6
    train[0] = True
    return Graph(torch.randn(n, 4, generator=gen), edge_index, torch.randint(0, classes, (n,), generator=gen),
                 train_mask=train, test_mask=~train)


# -- METIS ---------------------------------------------------------------------------------------------
@settings(max_examples=examples(40), deadline=None)
@given(graph=random_graphs(), data=st.data())
def test_metis_clusters_partition_the_nodes(graph, data):
    n, edge_index = graph
    parts = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 3))
    cluster = metis_clusters(edge_index, n, parts, seed=seed, cache=False)
    assert cluster.dtype == torch.int64 and cluster.shape == (n,)      # one cluster per node
    assert int(cluster.min()) >= 0 and int(cluster.max()) < parts
    assert torch.bincount(cluster, minlength=parts).min() >= 1           # exactly `parts` non-empty clusters
    again = metis_clusters(edge_index, n, parts, seed=seed, cache=False)
    assert torch.equal(cluster, again)                                   # deterministic


def test_metis_follows_components_and_keeps_isolated_nodes():
    # Three 6-cliques, no edges between them, and 4 isolated nodes.
    cliques = [(a + 6 * c, b + 6 * c) for c in range(3) for a in range(6) for b in range(6) if a != b]
    edge_index = torch.tensor(cliques).t()
    cluster = metis_clusters(edge_index, 22, 3, cache=False)
    assert torch.bincount(cluster, minlength=3).min() >= 1
    for c in range(3):  # a good cut never splits a clique when the parts can follow the components
        assert torch.unique(cluster[6 * c:6 * c + 6]).numel() == 1
    assert torch.unique(cluster[:18]).numel() == 3


def test_metis_cache_hit_runs_no_metis(tmp_path, monkeypatch):
    graph = graphs.sbm(300, 3, avg_degree=6, seed=1)
    first = metis_clusters(graph.edge_index, graph.num_nodes, 8, seed=2, cache=tmp_path)
    files = list(tmp_path.glob("metis-*.npy"))
    assert len(files) == 1 and "-p8-s2" in files[0].name
    monkeypatch.setattr(graphs, "_metis", lambda *a: pytest.fail("METIS ran on a cache hit"))
    assert torch.equal(metis_clusters(graph.edge_index, graph.num_nodes, 8, seed=2, cache=tmp_path), first)
    # Another part count, seed or graph is another entry.
    monkeypatch.undo()
    metis_clusters(graph.edge_index, graph.num_nodes, 9, seed=2, cache=tmp_path)
    metis_clusters(graph.edge_index[:, 1:], graph.num_nodes, 8, seed=2, cache=tmp_path)
    assert len(list(tmp_path.glob("metis-*.npy"))) == 3
    # A damaged entry is recomputed, not trusted.
    files[0].write_bytes(b"not a numpy file")
    assert torch.equal(metis_clusters(graph.edge_index, graph.num_nodes, 8, seed=2, cache=tmp_path), first)


def test_isolated_nodes_get_clusters():
    edge_index = torch.zeros(2, 0, dtype=torch.int64)
    cluster = metis_clusters(edge_index, 7, 7, cache=False)
    assert sorted(cluster.tolist()) == list(range(7))


# -- batches ---------------------------------------------------------------------------------------------
@settings(max_examples=examples(60), deadline=None)
@given(graph=random_graphs(), data=st.data())
def test_subgraph_is_the_induced_subgraph(graph, data):
    n, edge_index = graph
    parts = data.draw(st.integers(1, n))
    assignment = data.draw(st.lists(st.integers(0, parts - 1), min_size=n, max_size=n))
    cluster = torch.tensor(assignment)
    cluster = torch.unique(cluster, return_inverse=True)[1]  # no empty cluster ids
    partition = Partition(_graph(n, edge_index), cluster)
    chosen = data.draw(st.lists(st.integers(0, partition.parts - 1), min_size=1, unique=True))
    nodes, local = partition.subgraph(chosen)

    expected_nodes = torch.cat([torch.nonzero(cluster == c).reshape(-1) for c in chosen])
    assert sorted(nodes.tolist()) == sorted(expected_nodes.tolist())    # the union, each node once
    assert torch.unique(nodes).numel() == nodes.numel()
    assert local.dtype == torch.int64 and local.shape[0] == 2
    if local.numel():
        assert int(local.min()) >= 0 and int(local.max()) < nodes.numel()   # relabelled in range
    member = torch.zeros(n, dtype=torch.bool)
    member[nodes] = True
    keep = member[edge_index[0]] & member[edge_index[1]]
    expected = sorted(map(tuple, edge_index[:, keep].t().tolist()))
    got = sorted(map(tuple, nodes[local].t().tolist()))
    assert got == expected                                              # induced subgraph, duplicates kept


def test_cluster_batches_visit_every_cluster_once_per_pass():
    graph = graphs.sbm(400, 4, avg_degree=6, seed=3)
    partition = Partition.metis(graph, 20, cache=False)
    batches = ClusterBatches(partition, clusters_per_batch=3, seed=5)
    assert len(batches) == 7
    first = list(batches)
    seen = torch.cat([x for (x, _), _ in first])
    assert seen.shape[0] == graph.num_nodes                              # every node once per pass
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, graph.x.tolist()))
    for (x, edge_index), targets in first:
        assert targets.shape[0] == x.shape[0]
        labelled = targets != IGNORE_INDEX
        assert labelled.any()
    # Targets hold exactly the training labels.
    train_rows = sum(int((t != IGNORE_INDEX).sum()) for _, t in first)
    assert train_rows == int(graph.train_mask.sum())
    second = list(batches)                                                # a new pass: another shuffle
    assert any(a[0][0].shape != b[0][0].shape or not torch.equal(a[0][0], b[0][0]) for a, b in zip(first, second))
    replay = list(ClusterBatches(partition, clusters_per_batch=3, seed=5))  # same seed, same sequence
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1]) for a, b in zip(first, replay))


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_graphs_are_refused_with_clear_messages():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(GraphError, match=r"refers to node 5 .* 5 nodes, ids 0\.\.4"):
        Graph(x, torch.tensor([[0, 1], [1, 5]]), y)
    with pytest.raises(GraphError, match=r"refers to node -1"):
        Graph(x, torch.tensor([[0, -1], [1, 2]]), y)
    with pytest.raises(GraphError, match=r"y has 4 labels but x has 5 rows"):
        Graph(x, torch.tensor([[0], [1]]), y[:4])
    with pytest.raises(GraphError, match=r"train_mask has shape \[4\] but the graph has 5 nodes"):
        Graph(x, torch.tensor([[0], [1]]), y, train_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(GraphError, match=r"\[2, num_edges\].*transposed"):
        Graph(x, torch.tensor([[0, 1], [1, 2], [2, 3]]), y)
    with pytest.raises(GraphError, match=r"integer node ids"):
        Graph(x, torch.tensor([[0.0], [1.0]]), y)
    with pytest.raises(GraphError, match=r"boolean mask"):
        Graph(x, torch.tensor([[0], [1]]), y, test_mask=torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(GraphError, match=r"multi-hot"):
        Graph(x, torch.tensor([[0], [1]]), torch.full((5, 2), 0.5))


def test_more_clusters_than_nodes_is_refused():
    with pytest.raises(GraphError, match=r"parts=6 clusters but the graph has only 5 nodes.*parts <= 5"):
        metis_clusters(torch.tensor([[0, 1], [1, 2]]), 5, 6, cache=False)
    with pytest.raises(GraphError, match=r"refers to node 9"):
        metis_clusters(torch.tensor([[0, 9], [1, 2]]), 5, 2, cache=False)
    with pytest.raises(GraphError, match=r"parts must be an int >= 1"):
        metis_clusters(torch.tensor([[0], [1]]), 5, 0, cache=False)


# -- the SBM generator -----------------------------------------------------------------------------------------
def test_sbm_is_a_simple_undirected_homophilous_graph():
    graph = graphs.sbm(2000, 5, avg_degree=12, homophily=0.8, num_features=8, isolated=0.05, seed=4)
    src, dst = graph.edge_index
    assert not bool((src == dst).any())
    forward = set(zip(src.tolist(), dst.tolist()))
    assert len(forward) == graph.num_edges and all((b, a) in forward for a, b in forward)
    assert abs(graph.num_edges / graph.num_nodes - 12) < 1.5
    same = float((graph.y[src] == graph.y[dst]).float().mean())
    assert 0.75 < same < 0.9                                              # 0.8 + 0.2 / 5 expected
    degree = torch.bincount(src, minlength=graph.num_nodes)
    assert 0.03 < float((degree == 0).float().mean()) < 0.08             # isolated nodes
    assert int(graph.train_mask.sum()) == 1200 and not bool((graph.train_mask & graph.test_mask).any())
    again = graphs.sbm(2000, 5, avg_degree=12, homophily=0.8, num_features=8, isolated=0.05, seed=4)
    assert torch.equal(again.edge_index, graph.edge_index) and torch.equal(again.x, graph.x)


def test_a_million_edge_sbm_partitions_and_batches(tmp_path):
    graph = graphs.sbm(10_000, 10, avg_degree=100, num_features=8, seed=0)
    assert graph.num_edges > 950_000
    partition = Partition.metis(graph, 40, cache=tmp_path)
    assert partition.parts == 40 and int(partition.sizes.min()) >= 1
    src, dst = graph.edge_index
    cut = float((partition.cluster[src] != partition.cluster[dst]).float().mean())
    assert cut < 0.9                                                      # far better than random (39/40)
    nodes, local = partition.subgraph([0, 1])
    assert int(local.max()) < nodes.numel()


# -- scores ----------------------------------------------------------------------------------------------------------
def test_micro_f1_matches_scikit_learn():
    from sklearn import metrics

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=gen)
    targets = torch.randint(0, 4, (50,), generator=gen)
    keep = torch.rand(50, generator=gen) < 0.7
    scores = graphs.micro_f1(logits, graphs.masked_targets(targets, keep))
    pred = logits.argmax(1)
    assert scores["nodes"] == int(keep.sum())
    assert scores["micro_f1"] == pytest.approx(metrics.f1_score(targets[keep], pred[keep], average="micro"))
    assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(targets[keep], pred[keep]))
    multi = (torch.rand(50, 6, generator=gen) < 0.3).float()
    logits = torch.randn(50, 6, generator=gen)
    scores = graphs.micro_f1(logits, graphs.masked_targets(multi, keep))
    expected = metrics.f1_score(multi[keep].numpy(), (logits[keep] > 0).numpy(), average="micro")
    assert scores["micro_f1"] == pytest.approx(expected)
    assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(multi[keep].numpy(), (logits[keep] > 0).numpy()))


# -- loaders --------------------------------------------------------------------------------------------------------
def _tiny(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 6
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = rng.integers(0, 3, n)
    edges = np.array([[0, 1], [1, 2], [3, 4], [2, 0]])  # node 5 isolated
    return n, x, y, edges


@pytest.mark.parametrize("fmt", ["coo", "csr"])
def test_reddit_loader_reads_pyg_raw_files(tmp_path, fmt):
    n, x, y, edges = _tiny()
    raw = tmp_path / "raw"
    raw.mkdir()
    types = np.array([1, 1, 2, 3, 1, 3])
    np.savez(raw / "reddit_data.npz", feature=x, label=y, node_types=types)
    both = np.concatenate([edges, edges[:, ::-1], edges[:1]])             # a duplicate edge is coalesced
    adj = sparse.coo_matrix((np.ones(len(both)), (both[:, 0], both[:, 1])), shape=(n, n))
    sparse.save_npz(raw / "reddit_graph.npz", adj.tocsr() if fmt == "csr" else adj, compressed=True)
    graph = graph_datasets.load("reddit", tmp_path)
    assert graph.num_nodes == n
    assert torch.equal(graph.x, torch.from_numpy(x)) and torch.equal(graph.y, torch.from_numpy(y))
    assert sorted(map(tuple, graph.edge_index.t().tolist())) == sorted({tuple(e) for e in both.tolist()})
    assert graph.train_mask.tolist() == [True, True, False, False, True, False]
    assert graph.val_mask.tolist() == [False, False, True, False, False, False]
    assert graph.test_mask.tolist() == [False, False, False, True, False, True]


def _gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(",".join(str(v) for v in np.atleast_1d(row)) + "\n")


def test_ogbn_products_loader_reads_ogb_raw_layout(tmp_path):
    n, x, y, edges = _tiny()
    root = tmp_path / "ogbn_products"
    _gz(root / "raw" / "edge.csv.gz", edges)
    _gz(root / "raw" / "node-feat.csv.gz", x)
    _gz(root / "raw" / "node-label.csv.gz", y)
    _gz(root / "raw" / "num-node-list.csv.gz", [n])
    _gz(root / "raw" / "num-edge-list.csv.gz", [len(edges)])
    for name, ids in (("train", [0, 1, 4]), ("valid", [2]), ("test", [3, 5])):
        _gz(root / "split" / "sales_ranking" / f"{name}.csv.gz", ids)
    graph = graph_datasets.ogbn_products(tmp_path)                          # finds root/ogbn_products
    torch.testing.assert_close(graph.x, torch.from_numpy(x))
    assert graph.y.tolist() == y.tolist()
    assert sorted(map(tuple, graph.edge_index.t().tolist())) == sorted(
        [tuple(e) for e in edges.tolist()] + [tuple(e[::-1]) for e in edges.tolist()])
    assert torch.nonzero(graph.train_mask).reshape(-1).tolist() == [0, 1, 4]
    assert torch.nonzero(graph.test_mask).reshape(-1).tolist() == [3, 5]


@pytest.mark.parametrize("networkx1", [False, True])
@pytest.mark.parametrize("multilabel", [False, True])
def test_amazon2m_loader_reads_cluster_gcn_files(tmp_path, networkx1, multilabel):
    n, x, y, edges = _tiny()
    ids = [f"n{i}" for i in range(n)]
    rows = [3, 0, 5, 1, 2, 4]                                               # id_map reorders the nodes
    nodes = [{"id": ids[i], "val": i == 2, "test": i in (3, 5)} for i in range(n)]
    links = [{"source": int(a) if networkx1 else ids[a], "target": int(b) if networkx1 else ids[b]} for a, b in edges]
    json.dump({"directed": False, "multigraph": False, "graph": {}, "nodes": nodes, "links": links},
              open(tmp_path / "amazon2M-G.json", "w"))
    json.dump({ids[i]: rows[i] for i in range(n)}, open(tmp_path / "amazon2M-id_map.json", "w"))
    labels = {ids[i]: ([int(j == y[i]) for j in range(3)] if multilabel else int(y[i])) for i in range(n)}
    json.dump(labels, open(tmp_path / "amazon2M-class_map.json", "w"))
    feats = np.zeros_like(x)
    feats[rows] = x
    np.save(tmp_path / "amazon2M-feats.npy", feats)
    graph = graph_datasets.amazon2m(tmp_path)
    back = torch.tensor(rows)
    torch.testing.assert_close(graph.x[back], torch.from_numpy(x))
    if multilabel:
        assert graph.multilabel and graph.y[back].argmax(1).tolist() == y.tolist()
    else:
        assert graph.y[back].tolist() == y.tolist()
    expected = {(rows[a], rows[b]) for a, b in edges} | {(rows[b], rows[a]) for a, b in edges}
    assert set(map(tuple, graph.edge_index.t().tolist())) == expected
    assert graph.val_mask[back].tolist() == [i == 2 for i in range(n)]
    assert graph.test_mask[back].tolist() == [i in (3, 5) for i in range(n)]
    assert graph.train_mask[back].tolist() == [i in (0, 1, 4) for i in range(n)]


def test_loaders_say_where_the_files_go(tmp_path):
    with pytest.raises(GraphError, match=r"reddit_data\.npz.*not found.*reddit\.zip"):
        graph_datasets.reddit(tmp_path)
    with pytest.raises(GraphError, match=r"raw/edge\.csv\.gz.*not found.*products\.zip"):
        graph_datasets.ogbn_products(tmp_path)
    with pytest.raises(GraphError, match=r"amazon2M-G\.json.*not found.*ogbn_products"):
        graph_datasets.amazon2m(tmp_path)
    with pytest.raises(GraphError, match=r"unknown graph dataset 'cora'"):
        graph_datasets.load("cora", tmp_path)


def test_standardized_uses_training_statistics():
    graph = graphs.sbm(300, 3, num_features=5, feature_signal=3.0, seed=6)
    scaled = graph.standardized()
    train = scaled.x[graph.train_mask]
    torch.testing.assert_close(train.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0), torch.ones(5), atol=1e-5, rtol=0)
    assert not torch.allclose(scaled.x[graph.test_mask].mean(0), torch.zeros(5), atol=1e-5)
    assert scaled.edge_index is graph.edge_index and torch.equal(scaled.y, graph.y)
