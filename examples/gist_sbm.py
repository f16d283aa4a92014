"""GIST versus full training of a GCN on a stochastic block model, on Cluster-GCN mini-batches.

The graph (10,000 nodes, ~100,000 edges, 8 classes, features that alone are
weak evidence) is cut into METIS clusters; a mini-batch is the subgraph
induced by a few random clusters. Both runs start from the same weights and
take the same number of Adam steps on the same batches: the full GCN, and S
sub-GCNs that each hold 1/S of the hidden features (every sub-GCN trains on
the same batches, as in the GIST paper; ``--mode shuffled`` or ``disjoint``
gives each its own clusters). The script prints test micro-F1 of both on
the full graph, and the training time of each (GIST's sub-GCNs train one
after another here). About a minute on 2 cores.

    python examples/gist_sbm.py                          # 4 sub-GCNs
    python examples/gist_sbm.py --subnets 8 --mode disjoint
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import istfx
from istfx.graph import gist, graphs
from istfx.models import GCN


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subnets", type=int, default=4, help="sub-GCNs per round (S)")
    parser.add_argument("--mode", choices=gist.MODES, default="same", help="which clusters each sub-GCN sees")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--hidden", type=int, default=256, help="hidden features of the full GCN")
    parser.add_argument("--parts", type=int, default=50, help="METIS clusters")
    parser.add_argument("--q", type=int, default=5, help="clusters per mini-batch")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the clusters (both runs)")
    parser.add_argument("--local-steps", type=int, default=5, help="Adam steps per sub-GCN per round")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    graph = graphs.sbm(args.nodes, 8, avg_degree=10, homophily=0.75, num_features=32, feature_signal=0.6,
                       seed=args.seed)
    print(graph)
    data = gist.ClusterData(graph, args.parts, args.q, mode=args.mode, subnets=args.subnets, seed=args.seed)
    print(f"METIS: {args.parts} clusters in {data.partition_seconds:.2f}s (cached on disk for the next run)")
    torch.manual_seed(args.seed)
    model = GCN(graph.num_features, args.hidden, graph.num_classes)
    full = copy.deepcopy(model)
    batches = graphs.ClusterBatches(data.partition, args.q, seed=args.seed)  # all clusters, whatever the mode
    steps = args.epochs * len(batches)

    # -- the full GCN -------------------------------------------------------------------------
    optimizer = torch.optim.Adam(full.parameters(), lr=args.lr)
    start, done = time.perf_counter(), 0
    while done < steps:
        for (x, edge_index), targets in batches:
            loss = gist.node_loss(full(x, edge_index), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    full_seconds = time.perf_counter() - start

    # -- GIST -----------------------------------------------------------------------------------
    ist = istfx.compile(model, subnets=args.subnets, example_inputs=gist.example_inputs(graph), seed=args.seed)
    print(ist.plan)
    start = time.perf_counter()
    history = istfx.fit(ist, data, rounds=max(1, steps // args.local_steps), local_steps=args.local_steps,
                        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr), loss_fn=gist.node_loss,
                        eval_data=gist.eval_batches(graph, "val"), eval_every=10, carry_optimizer_state=True,
                        progress=False)
    gist_seconds = time.perf_counter() - start

    scores_full = graphs.evaluate_nodes(full, graph, "test")
    scores_gist = graphs.evaluate_nodes(model, graph, "test")
    labels = [f"full GCN, hidden {args.hidden}",
              f"GIST, {args.subnets} sub-GCNs of hidden ~{args.hidden // args.subnets}"]
    width = max(map(len, labels))
    print(f"{labels[0]:<{width}}  test micro-F1 {scores_full['micro_f1']:.4f}  {steps} steps in {full_seconds:.1f}s")
    print(f"{labels[1]:<{width}}  test micro-F1 {scores_gist['micro_f1']:.4f}  {len(history)} rounds x "
          f"{args.local_steps} steps per sub-GCN in {gist_seconds:.1f}s (sub-GCNs one after another here; "
          "validation checks included)")


if __name__ == "__main__":
    main()
