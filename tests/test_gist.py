"""GIST: sub-GCNs trained with IST on Cluster-GCN mini-batches.

- the loss and the metrics see only labelled nodes (``fit`` agrees with
  ``evaluate_nodes`` on the full graph);
- data modes: ``same`` gives every sub-GCN the same batches, ``shuffled``
  its own shuffle, ``disjoint`` deals the clusters out exactly once;
- GIST learns on KarateClub, on an easy SBM (far above chance) and on a
  disconnected graph with isolated nodes;
- ``istfx train --topology sharded`` on 2 gloo processes trains a GCN whose
  hidden width is twice what each rank stores, reproducing the local backend.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import pymetis  # noqa: F401  (the test extra: METIS clusters)
import torch
import torch.nn.functional as F

import istfx
from istfx.graph import gist, graphs
from istfx.cli.train import main as train_main
from istfx.graph.graphs import IGNORE_INDEX, Graph, GraphError
from istfx.models import GCN


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: one thread. Two threads on a busy 2-core machine make index_add steps ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adam(lr: float = 0.02):
    return lambda params: torch.optim.Adam(params, lr=lr)


@pytest.fixture(scope="module")
def easy():
    """4 classes, strongly homophilous, features alone weak: the graph must help."""
    return graphs.sbm(1200, 4, avg_degree=10, homophily=0.9, num_features=16, feature_signal=0.7, seed=0)


# -- loss and metrics ------------------------------------------------------------------------------------
def test_node_loss_sees_only_labelled_nodes():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 3, generator=gen, requires_grad=True)
    y = torch.randint(0, 3, (10,), generator=gen)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    loss = gist.node_loss(logits, graphs.masked_targets(y, keep))
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], y[keep]))
    loss.backward()
    assert bool((logits.grad[~keep] == 0).all()) and bool((logits.grad[keep] != 0).any())
    empty = gist.node_loss(logits, torch.full((10,), IGNORE_INDEX))
    assert float(empty.detach()) == 0.0                                        # not NaN
    multi = (torch.rand(10, 3, generator=gen) < 0.5).float()
    torch.testing.assert_close(gist.node_loss(logits, graphs.masked_targets(multi, keep)),
                               F.binary_cross_entropy_with_logits(logits[keep], multi[keep]))


def test_fit_scores_only_the_evaluation_mask(easy):
    torch.manual_seed(0)
    model = GCN(easy.num_features, 16, easy.num_classes)
    ist = istfx.compile(model, 2, example_inputs=gist.example_inputs(easy))
    data = gist.ClusterData(easy, parts=12, clusters_per_batch=3, cache=False)
    history = istfx.fit(ist, data, rounds=2, local_steps=2, optimizer=_adam(), loss_fn=gist.node_loss,
                        eval_data=gist.eval_batches(easy, "test"), progress=False)
    scores = graphs.evaluate_nodes(model, easy, "test")
    assert history.last["eval_accuracy"] == pytest.approx(scores["accuracy"])
    assert history.last["eval_loss"] == pytest.approx(scores["loss"], rel=1e-5)
    # Samples counted per round are training nodes only.
    assert history.last["samples"] <= 2 * 2 * int(easy.train_mask.sum())
    assert history.last["train_accuracy"] is not None


# -- data modes ---------------------------------------------------------------------------------------------
def _nodes_seen(batches, passes: int = 1) -> list[torch.Tensor]:
    out = []
    for _ in range(passes):
        for (x, _), _ in batches:
            out.append(x)
    return out


def test_modes_same_shuffled_disjoint(easy):
    same = gist.ClusterData(easy, parts=12, clusters_per_batch=3, mode="same", cache=False)
    a, b = _nodes_seen(same(0)), _nodes_seen(same(1))
    assert all(torch.equal(p, q) for p, q in zip(a, b))                    # the paper: same batches
    shuffled = gist.ClusterData(easy, parts=12, clusters_per_batch=3, mode="shuffled", cache=False)
    a, b = _nodes_seen(shuffled(0)), _nodes_seen(shuffled(1))
    assert not all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(a, b))
    assert sum(p.shape[0] for p in a) == sum(q.shape[0] for q in b) == easy.num_nodes
    disjoint = gist.ClusterData(easy, parts=12, clusters_per_batch=2, mode="disjoint", subnets=3, cache=False)
    owned = [disjoint.clusters_of(s) for s in range(3)]
    assert sorted(torch.cat(owned).tolist()) == list(range(12))             # each cluster to one sub-GCN
    assert [o.numel() for o in owned] == [4, 4, 4]
    for s in range(3):
        rows = torch.cat(_nodes_seen(disjoint(s)))
        mine = torch.isin(disjoint.partition.cluster, owned[s])
        assert rows.shape[0] == int(mine.sum())
    with pytest.raises(GraphError, match="pass subnets=S"):
        gist.ClusterData(easy, parts=12, mode="disjoint", cache=False)
    with pytest.raises(GraphError, match="mode must be one of"):
        gist.ClusterData(easy, parts=12, mode="random", cache=False)


# -- GIST learns --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["same", "disjoint"])
def test_gist_learns_an_easy_sbm(easy, mode):
    torch.manual_seed(0)
    model = GCN(easy.num_features, 32, easy.num_classes)
    before = graphs.evaluate_nodes(model, easy, "test")["accuracy"]
    ist = istfx.compile(model, 4, example_inputs=gist.example_inputs(easy))
    data = gist.ClusterData(easy, parts=16, clusters_per_batch=4, mode=mode, subnets=4, cache=False)
    istfx.fit(ist, data, rounds=8, local_steps=4, optimizer=_adam(), loss_fn=gist.node_loss, progress=False)
    scores = graphs.evaluate_nodes(model, easy, "test")
    assert scores["micro_f1"] > 0.8 > before + 0.3                          # chance is 0.25


def test_gist_on_karate_club():
    from torch_geometric import datasets

    data = datasets.KarateClub()[0]
    graph = Graph(data.x, data.edge_index, data.y, train_mask=data.train_mask, test_mask=~data.train_mask,
                  name="karate")
    torch.manual_seed(0)
    model = GCN(graph.num_features, 16, graph.num_classes)
    ist = istfx.compile(model, 2, example_inputs=gist.example_inputs(graph))
    clusters = gist.ClusterData(graph, parts=4, clusters_per_batch=4, cache=False)   # q = all: full batches
    istfx.fit(ist, clusters, rounds=15, local_steps=5, optimizer=_adam(0.05), loss_fn=gist.node_loss,
              progress=False)
    assert graphs.evaluate_nodes(model, graph, "train")["accuracy"] == 1.0      # the 4 labelled nodes
    assert graphs.evaluate_nodes(model, graph, "test")["accuracy"] > 0.5        # 30 unseen nodes, chance 0.25


def test_disconnected_graph_with_isolated_nodes_trains():
    graph = graphs.sbm(600, 3, avg_degree=6, homophily=0.9, feature_signal=1.5, isolated=0.1, seed=2)
    # Two copies side by side: a disconnected graph, 10% of its nodes isolated.
    n = graph.num_nodes
    both = Graph(torch.cat([graph.x, graph.x]), torch.cat([graph.edge_index, graph.edge_index + n], 1),
                 torch.cat([graph.y, graph.y]), torch.cat([graph.train_mask] * 2),
                 test_mask=torch.cat([graph.test_mask] * 2))
    degree = torch.bincount(both.edge_index[0], minlength=both.num_nodes)
    assert int((degree == 0).sum()) > 50
    torch.manual_seed(0)
    model = GCN(both.num_features, 16, both.num_classes)
    ist = istfx.compile(model, 2, example_inputs=gist.example_inputs(both))
    data = gist.ClusterData(both, parts=10, clusters_per_batch=2, mode="shuffled", cache=False)
    history = istfx.fit(ist, data, rounds=6, local_steps=4, optimizer=_adam(), loss_fn=gist.node_loss,
                        progress=False)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history)
    assert graphs.evaluate_nodes(model, both, "test")["accuracy"] > 0.6


# -- istfx train, sharded over 2 processes ------------------------------------------------------------------------
MODEL = '''
import functools
import torch
from istfx.graph import gist, graphs
from istfx.models import GCN

HIDDEN = 64


@functools.cache
def graph():
    return graphs.sbm(500, 3, avg_degree=8, homophily=0.9, num_features=8, feature_signal=0.8, seed=0)


def build_model():
    return GCN(8, HIDDEN, 3)


example_inputs = (torch.randn(6, 8), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]]))
loss_fn = gist.node_loss


def train_batches(subnet, subnets, seed):
    return gist.ClusterData(graph(), 8, 2, mode="disjoint", subnets=subnets, seed=seed)(subnet)


def eval_batches():
    return gist.eval_batches(graph(), "test")
'''


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_istfx_train_sharded_holds_a_slice_of_the_width(tmp_path, monkeypatch):
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available(), \
        "istfx train runs on torch.distributed with gloo; this torch build has neither"
    (tmp_path / "gcn.py").write_text(MODEL, encoding="utf-8")
    monkeypatch.setenv("ISTFX_CACHE", str(tmp_path / "cache"))  # the ranks share one METIS cache entry
    common = ["--subnets", "2", "--rounds", "4", "--local-steps", "3", "--lr", "0.2", "--seed", "1",
              "--threads", "1", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "istfx.cli.train", str(tmp_path / "gcn.py"), "--topology", "sharded",
                           "--metrics", str(tmp_path / "sharded.jsonl"), *common],
                          capture_output=True, text=True, timeout=170, env=dict(os.environ), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "cache" / "metis").glob("metis-*.npy"))) == 1
    assert train_main([str(tmp_path / "gcn.py"), "--backend", "local", "--metrics",
                       str(tmp_path / "local.jsonl"), *common]) == 0
    sharded, local = _metrics(tmp_path / "sharded.jsonl"), _metrics(tmp_path / "local.jsonl")
    assert len(sharded) == 4
    # Each rank stores exactly a GCN of half the hidden width: the full model is 2x wider than any worker.
    half = sum(p.numel() for p in GCN(8, 32, 3).parameters()) * 4
    full = sum(p.numel() for p in GCN(8, 64, 3).parameters()) * 4
    for row in sharded:
        assert row["state_bytes"] == [half, half]
        assert row["model_parameter_bytes"] == full
    assert 2 * half - full == 3 * 4                                            # only the output bias is shared
    # Same seed, same clusters, same batches: the sharded run is the local one.
    for a, b in zip(sharded, local):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=0.01)
    assert sharded[-1]["eval_accuracy"] > 0.6                                  # 3 classes: chance 0.33
