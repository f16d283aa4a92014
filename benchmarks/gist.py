"""GIST vs full training of a GCN on Cluster-GCN mini-batches, side by side in one run.

    python benchmarks/gist.py            # 100k nodes, ~1M edges, hidden 512 (~9 minutes on 2 busy cores)
    python benchmarks/gist.py --quick    # 20k nodes, ~200k edges, METIS on 1M edges (~1.5 minutes)

Like the GIST paper's Amazon2M table (micro-F1 and training time of the full
GCN against GIST with 2, 4 and 8 sub-GCNs), on a synthetic graph built here:
a stochastic block model (``istfx.graph.graphs.sbm``) whose features alone are weak
evidence, so the GCN must use the graph. The graph is cut into METIS clusters
(``--parts``) and every run trains on the same Cluster-GCN mini-batches: the
subgraph induced by ``--q`` random clusters.

- ``full``: Adam on the whole GCN, ``--epochs`` passes over the batches.
- ``gist_S``: ``istfx.fit`` with S sub-GCNs (the hidden features of every
  graph convolution dealt out each round), each sub-GCN taking
  ``--local-steps`` Adam steps per round on the same batches as the full run
  (``mode="same"``, as in the paper), for as many rounds as make the same
  number of steps. Adam's moments are carried across rounds (cut and written
  back like the weights); ``gist_4_fresh`` restarts Adam every round, IST's
  plain protocol, for comparison.

All runs start from the same weights and run in this one process on
``--threads`` threads, one after another. Two clocks: ``seconds`` is the
measured training time (GIST's S sub-GCNs train one after another here), and
``S workers`` charges each round its cut/write-back time plus its slowest
sub-GCN: what the round takes with one worker per sub-GCN and free
communication (the paper's setting, one GPU per sub-GCN). Evaluation
(micro-F1 of the full model on the full graph's test nodes) is not timed.

METIS partition time is measured with the cache off on the training graph
and on SBMs of ``--metis-nodes`` nodes (average degree 20: 1M directed
edges per 50k nodes).

Writes ``docs/gist.json`` and ``docs/gist.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import istfx
from istfx.graph import gist, graphs
from istfx.backends import LocalBackend, RoundResult
from istfx.models import GCN

ROOT = Path(__file__).resolve().parent.parent


class TimedBackend(LocalBackend):
    """The local backend with clocks: ``seconds`` (measured) and ``parallel`` (S workers side by side)."""

    name = "timed-local"

    def __init__(self) -> None:
        super().__init__()
        self.seconds = self.parallel = 0.0
        self.steps = 0

    def run_round(self, ist: istfx.ISTModel, round: int, train_subnet) -> RoundResult:
        result = super().run_round(ist, round, train_subnet)
        per_subnet = result.extra["subnet_seconds"]
        self.seconds += result.seconds
        self.parallel += result.seconds - sum(per_subnet) + max(per_subnet)
        self.steps += result.results[0].steps
        return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def _checkpoints(total: int, evals: int) -> set[int]:
    """`evals` evenly spaced counts in 1..total, the last one included."""
    return {math.ceil(k * total / evals) for k in range(1, evals + 1)}


def _score(model: torch.nn.Module, graph: graphs.Graph) -> dict:
    scores = graphs.evaluate_nodes(model, graph, "test")
    return {"micro_f1": scores["micro_f1"], "loss": scores["loss"]}


def run_full(model: GCN, data: gist.ClusterData, graph: graphs.Graph, steps: int, lr: float, evals: int) -> dict:
    """Adam on the whole model over the batches sub-GCN 0 sees (the same sequence)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = data(0)
    due = _checkpoints(steps, evals)
    curve, seconds, done = [], 0.0, 0
    model.train()
    while done < steps:
        for (x, edge_index), targets in batches:
            start = time.perf_counter()
            loss = gist.node_loss(model(x, edge_index), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - start
            done += 1
            if done in due:
                curve.append({"steps": done, "seconds": round(seconds, 3), "parallel_seconds": round(seconds, 3),
                              **_score(model, graph)})
            if done == steps:
                break
    return {"seconds": seconds, "parallel_seconds": seconds, "steps": done, "curve": curve,
            "parameters": sum(p.numel() for p in model.parameters()), "hidden": model.hidden_channels}


def run_gist(model: GCN, subnets: int, data: gist.ClusterData, graph: graphs.Graph, steps: int, lr: float,
             local_steps: int, evals: int, carry: bool) -> dict:
    """GIST with `subnets` sub-GCNs, each taking `steps` steps in all."""
    start = time.perf_counter()
    ist = istfx.compile(model, subnets=subnets, example_inputs=gist.example_inputs(graph))
    compile_seconds = time.perf_counter() - start
    backend = TimedBackend()
    rounds = max(1, steps // local_steps)
    due = _checkpoints(rounds, evals)
    curve: list[dict] = []

    def record(row: dict) -> None:
        if row["round"] + 1 in due:
            curve.append({"steps": backend.steps, "seconds": round(backend.seconds, 3),
                          "parallel_seconds": round(backend.parallel, 3), **_score(model, graph)})

    istfx.fit(ist, data, rounds=rounds, local_steps=local_steps,
              optimizer=lambda params: torch.optim.Adam(params, lr=lr), loss_fn=gist.node_loss,
              backend=backend, progress=False, callback=record, carry_optimizer_state=carry)
    split = ist.plan.assignment(0)
    hidden = [sum(len(parts[s]) for gid, parts in split.items()) // max(1, len(split)) for s in range(subnets)]
    return {"seconds": backend.seconds, "parallel_seconds": backend.parallel, "steps": backend.steps,
            "rounds": rounds, "curve": curve, "compile_seconds": compile_seconds, "carry_optimizer_state": carry,
            "parameters": ist.plan.parameters_full, "parameters_per_subnet": ist.plan.parameters_per_subnet,
            "hidden": max(hidden), "split_groups": len(split)}


def time_metis(nodes: int, degree: float, parts: int, seed: int) -> dict:
    """Seconds METIS takes on an SBM of `nodes` nodes (cache off)."""
    graph = graphs.sbm(nodes, 16, avg_degree=degree, num_features=1, seed=seed)
    start = time.perf_counter()
    graphs.metis_clusters(graph.edge_index, graph.num_nodes, parts, seed=seed, cache=False)
    return {"nodes": graph.num_nodes, "edges": graph.num_edges, "parts": parts,
            "seconds": time.perf_counter() - start}


def markdown(results: dict) -> str:
    g, cfg = results["graph"], results["config"]
    full = results["runs"]["full"]
    lines = [
        "# GIST on a stochastic block model",
        "",
        "Generated by `python benchmarks/gist.py" + (" --quick" if results["quick"] else "")
        + "` on this machine, every run in one process, one after another (numbers in "
          "[gist.json](gist.json)).",
        "",
        f"- Graph: SBM with **{g['nodes']:,} nodes, {g['edges']:,} directed edges** ({g['edges'] // 2:,} "
        f"undirected), **{g['features']} features**, {g['classes']} classes (homophily {cfg['homophily']}, "
        f"feature signal {cfg['feature_signal']}: features alone are weak evidence); train/val/test 60/20/20%.",
        f"- Model: {cfg['layers']}-layer GCN (`istfx.models.GCN`), **hidden width {cfg['hidden']}**.",
        f"- Data: {cfg['parts']} METIS clusters ({results['edge_cut']:.0%} of the edges cross clusters), "
        f"mini-batches of q = {cfg['q']} random clusters (about {results['batch_nodes']:,} nodes and "
        f"{results['batch_edges']:,} edges each), {results['batches_per_epoch']} per epoch; every run takes "
        f"{cfg['epochs']} epochs = {results['steps']} Adam steps (lr {cfg['lr']}); GIST {cfg['local_steps']} local "
        f"steps per round, every sub-GCN on the same batches (as in the paper).",
        f"- {results['threads']} thread, {results['machine']}, torch {results['torch']}. Absolute seconds "
        "depend on the machine and its load: compare the runs of one table.",
        "",
        "| run | hidden per worker | parameters per worker | test micro-F1 | training s (one process) "
        "| training s (S workers) | speed-up (S workers) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        f1 = run["curve"][-1]["micro_f1"]
        if name == "full":
            label, params = "full GCN", run["parameters"]
        else:
            s = len(run["parameters_per_subnet"])
            label = f"GIST, {s} sub-GCNs" + ("" if run["carry_optimizer_state"] else ", Adam reset every round")
            params = max(run["parameters_per_subnet"])
        lines.append(f"| {label} | {run['hidden']} | {params:,} | {f1:.4f} | {run['seconds']:.1f} | "
                     f"{run['parallel_seconds']:.1f} | {full['seconds'] / run['parallel_seconds']:.2f}x |")
    lines += [
        "",
        "*S workers*: each round is charged its cut and write-back time plus its slowest sub-GCN, i.e. one "
        "worker per sub-GCN with free communication (the paper ran one GPU per sub-GCN). *One process*: the S "
        "sub-GCNs of a round train one after another on this machine. Evaluation is not timed. Micro-F1 equals "
        "accuracy here (one class per node). A worker holds only its slice of the hidden features: the full "
        "GCN is S times wider than any sub-GCN (`istfx train --topology sharded` keeps it that way across "
        "processes: no rank ever stores the full width).",
        "",
        f"Test micro-F1 along training ({len(full['curve'])} evaluations, evenly spaced in steps):",
        "",
        "| run | " + " | ".join(f"{r['steps']} steps" for r in full["curve"]) + " |",
        "|---|" + "---:|" * len(full["curve"]),
    ]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['micro_f1']:.3f} ({r['parallel_seconds']:.0f} s)"
                                                  for r in run["curve"]) + " |")
    late = [r["micro_f1"] for r in full["curve"][len(full["curve"]) // 2:]]
    lines += [
        "",
        "(seconds on the S-worker clock in brackets.) Mini-batches of a few clusters are noisy: over the second "
        f"half of training the full run's micro-F1 moves within {min(late):.3f}..{max(late):.3f}, so differences "
        "of that size between runs are within one run's fluctuation.",
        "",
        "## METIS partition time",
        "",
        "pymetis (METIS 5), cache off; a cached partition loads in "
        f"{results['metis_cached_seconds'] * 1000:.0f} ms.",
        "",
        "| graph | nodes | directed edges | clusters | seconds |",
        "|---|---:|---:|---:|---:|",
        f"| training graph above | {g['nodes']:,} | {g['edges']:,} | {cfg['parts']} | "
        f"{results['metis_seconds']:.1f} |",
    ]
    for m in results["metis"]:
        lines.append(f"| SBM, average degree 20 | {m['nodes']:,} | {m['edges']:,} | {m['parts']} | "
                     f"{m['seconds']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller graph (under 5 minutes)")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--degree", type=float, default=10.0, help="average degree (directed edges per node)")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--homophily", type=float, default=0.8)
    p.add_argument("--feature-signal", type=float, default=0.8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--parts", type=int, default=None, help="METIS clusters")
    p.add_argument("--q", type=int, default=None, help="clusters per mini-batch")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--subnets", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--no-fresh", action="store_true", help="skip the run that resets Adam every round")
    p.add_argument("--evals", type=int, default=None, help="evaluations along each run (default 8, --quick 4)")
    p.add_argument("--metis-nodes", type=int, nargs="*", default=None,
                   help="SBM sizes (average degree 20) whose METIS time is measured")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "gist.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "gist.md"))
    p.add_argument("--from-json", default=None, metavar="RESULTS.json",
                   help="only rewrite --md from saved results (no training)")
    args = p.parse_args(argv)
    if args.from_json:
        Path(args.md).write_text(markdown(json.loads(Path(args.from_json).read_text(encoding="utf-8"))),
                                 encoding="utf-8")
        print(f"wrote {args.md}")
        return 0
    nodes = args.nodes or (20_000 if args.quick else 100_000)
    parts = args.parts or (40 if args.quick else 200)
    q = args.q or (4 if args.quick else 10)
    evals = args.evals or (4 if args.quick else 8)
    metis_nodes = args.metis_nodes if args.metis_nodes is not None else ([50_000] if args.quick else [50_000, 200_000])
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    graph = graphs.sbm(nodes, args.classes, avg_degree=args.degree, homophily=args.homophily,
                       num_features=args.features, feature_signal=args.feature_signal, seed=args.seed)
    print(f"{graph} in {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    cluster = graphs.metis_clusters(graph.edge_index, graph.num_nodes, parts, seed=args.seed, cache=False)
    metis_seconds = time.perf_counter() - t
    cache = tempfile.mkdtemp(prefix="istfx-gist-bench-")
    try:
        graphs.metis_clusters(graph.edge_index, graph.num_nodes, parts, seed=args.seed, cache=cache)  # fill it
        data = gist.ClusterData(graph, parts, q, mode="same", seed=args.seed, cache=cache)  # a cache hit
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert torch.equal(data.partition.cluster, cluster)
    src, dst = graph.edge_index
    edge_cut = float((cluster[src] != cluster[dst]).float().mean())
    print(f"METIS {parts} parts: {metis_seconds:.1f}s (cached {data.partition_seconds * 1000:.0f} ms), "
          f"edge cut {edge_cut:.1%}", flush=True)
    sample = list(data(0))
    batches = len(sample)
    batch_nodes = sum(x.shape[0] for (x, _), _ in sample) // batches
    batch_edges = sum(e.shape[1] for (_, e), _ in sample) // batches
    del sample
    steps = args.epochs * batches

    torch.manual_seed(args.seed)
    initial = GCN(graph.num_features, args.hidden, graph.num_classes, num_layers=args.layers)
    runs: dict[str, dict] = {}
    t = time.perf_counter()
    runs["full"] = run_full(copy.deepcopy(initial), data, graph, steps, args.lr, evals)
    print(f"full: micro-F1 {runs['full']['curve'][-1]['micro_f1']:.4f} in {runs['full']['seconds']:.1f}s "
          f"({time.perf_counter() - t:.0f}s with evaluation)", flush=True)
    plan = [(s, True) for s in args.subnets] + ([] if args.no_fresh else [(4, False)])
    for s, carry in plan:
        t = time.perf_counter()
        run = run_gist(copy.deepcopy(initial), s, data, graph, steps, args.lr, args.local_steps, evals, carry)
        name = f"gist_{s}" + ("" if carry else "_fresh")
        runs[name] = run
        print(f"{name}: micro-F1 {run['curve'][-1]['micro_f1']:.4f} in {run['seconds']:.1f}s "
              f"(S workers {run['parallel_seconds']:.1f}s; {time.perf_counter() - t:.0f}s with evaluation)",
              flush=True)

    metis = []
    for n in metis_nodes:
        metis.append(time_metis(n, 20.0, parts, args.seed))
        print(f"METIS: {metis[-1]}", flush=True)

    results = {
        "quick": args.quick,
        "graph": {"nodes": graph.num_nodes, "edges": graph.num_edges, "features": graph.num_features,
                  "classes": graph.num_classes},
        "config": {"homophily": args.homophily, "feature_signal": args.feature_signal, "hidden": args.hidden,
                   "layers": args.layers, "parts": parts, "q": q, "epochs": args.epochs,
                   "local_steps": args.local_steps, "lr": args.lr, "seed": args.seed},
        "steps": steps, "batches_per_epoch": batches, "batch_nodes": batch_nodes, "batch_edges": batch_edges,
        "metis_seconds": metis_seconds, "metis_cached_seconds": data.partition_seconds, "edge_cut": edge_cut,
        "metis": metis,
        "threads": args.threads, "torch": torch.__version__,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}",
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    Path(args.md).write_text(markdown(results), encoding="utf-8")
    print(f"wrote {args.out} and {args.md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
