"""GIST: a 2-layer GCN on a stochastic block model, trained on Cluster-GCN mini-batches.

    istfx train examples/models/gcn_sbm.py --subnets 4 --topology sharded --rounds 20 --local-steps 5

The graph (3,000 nodes, ~30,000 edges, 6 classes, features that alone are
weak evidence) is cut into 30 METIS clusters (cached under
``~/.cache/istfx/metis``, or ``$ISTFX_CACHE``); a mini-batch is the subgraph
induced by 5 random clusters, and every sub-GCN trains on the same batch
sequence, as in the GIST paper. IST splits the 256 hidden features of the
GCN: with ``--subnets 4`` each worker holds 64 of them, so with
``--topology sharded`` the full model is 4x wider than anything a worker
stores. Test accuracy (= micro-F1) is measured on the full graph.
"""
import functools

import torch

from istfx.graph import gist, graphs
from istfx.models import GCN

HIDDEN = 256
PARTS, CLUSTERS_PER_BATCH = 30, 5
MODE = "same"  # "shuffled" or "disjoint": each sub-GCN trains on different clusters


@functools.cache
def graph() -> graphs.Graph:
    """The data graph: fixed (seed 0) whatever --seed says, so runs differ only in training."""
    return graphs.sbm(3000, 6, avg_degree=10, num_features=32, feature_signal=0.6, homophily=0.8, seed=0)


def build_model():
    return GCN(in_channels=32, hidden_channels=HIDDEN, out_channels=6)


# Any small graph: node and edge counts are captured as dynamic.
example_inputs = (torch.randn(12, 32), torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]]))

loss_fn = gist.node_loss  # cross-entropy over the batch's training nodes only


@functools.cache
def _data(subnets: int, seed: int) -> gist.ClusterData:
    return gist.ClusterData(graph(), PARTS, CLUSTERS_PER_BATCH, mode=MODE, subnets=subnets, seed=seed)


def train_batches(subnet: int, subnets: int, seed: int):
    """Cluster-GCN mini-batches of sub-GCN `subnet`."""
    return _data(subnets, seed)(subnet)


def eval_batches():
    """The full graph, scored on its test nodes."""
    return gist.eval_batches(graph(), "test")
