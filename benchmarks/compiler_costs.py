"""What the compiler costs, over a model zoo: istfx.models, Hugging Face configs and PyG graph networks.

    python benchmarks/compiler_costs.py            # every model; writes docs/compiler_costs.json and the table
                                                   # in docs/benchmarks_compiler.md (~2-3 min on 2 busy cores)
    python benchmarks/compiler_costs.py --quick    # 5 smaller models, 3 timed pairs each, prints only (~30 s)
    python benchmarks/compiler_costs.py --only mlp gcn

For each model, in one process with one torch thread, at S = 4:

- **capture**: ``torch.export`` of the model (with the dynamic-dimension
  probes istfx runs), **analysis**: the axis analysis of the captured graph,
  reported also as a ratio to capture, and **plan + subnet graphs**: the rest
  of ``istfx.compile`` (groups, width/depth passes, plan, and the sliced
  subnet graph templates, built once per size signature). Each stage is
  timed inside the same ``istfx.compile`` call; the median over repeats.
- **round**: ``decompose(r)`` + ``reassemble(subnets)`` of one round (new
  assignment, slicing every parameter, writing every slice back), as a ratio
  to one ``clone()`` of every tensor of the model's ``state_dict()``: the
  memory-bandwidth floor of touching the whole state once. Timed side by side,
  alternating, on consecutive rounds; the ratio is the median of the pairs.
- **forward + backward**: one training step's forward and backward pass of
  the largest subnet as a ratio to the full model's (the user's module, eager)
  on the same batch, alternating; also of the captured full graph (the
  ``GraphModule`` subnets are cut from), which separates what the split saves
  from what running a captured graph costs.

Calls shorter than 20 ms are repeated within one timed sample (the sample is
their mean).

HF rows use the configs of ``benchmarks/zoo.py`` (hidden 32, 2 layers: the
zoo's tiny test configs), so their rounds and steps are dominated by per-op
overhead, not arithmetic; the istfx.models and PyG rows are sized so that
arithmetic shows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/zoo.py: the HF model list

Inputs = tuple[tuple, dict]


@dataclass
class Case:
    """A model of the zoo: how to build it, its example inputs, and a timing batch."""

    name: str
    family: str  # "istfx.models", "Hugging Face", "PyG"
    title: str
    build: Callable[[], tuple[nn.Module, Inputs, Inputs]]  # -> (model, example inputs, timing batch)
    quick: bool = False  # in --quick
    options: dict = field(default_factory=dict)  # extra istfx.compile options


def _ours(name: str, title: str, make: Callable[[], nn.Module], example: Callable[[int], Inputs], batch: int,
          quick: bool = False) -> Case:
    def build():
        torch.manual_seed(0)
        return make(), example(2), example(batch)

    return Case(name, "istfx.models", title, build, quick)


def _vector(features: int) -> Callable[[int], Inputs]:
    return lambda n: ((torch.randn(n, features, generator=torch.Generator().manual_seed(n)),), {})


def _image(channels: int, side: int) -> Callable[[int], Inputs]:
    return lambda n: ((torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(n)),), {})


def _tokens(vocab: int, length: int) -> Callable[[int], Inputs]:
    return lambda n: ((torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(n)),), {})


def _hf(name: str, quick: bool = False) -> Case:
    def build():
        import zoo

        return zoo.build(name), ((), zoo.inputs(name)), ((), zoo.inputs(name, batch=8, length=32))

    import zoo

    return Case(f"hf_{name}", "Hugging Face", zoo.ZOO[name].title + " (zoo config)", build, quick)


def _graph(nodes: int, edges: int, features: int, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(nodes, features, generator=gen), torch.randint(0, nodes, (2, edges), generator=gen)), {}


def _pyg(name: str, cls_name: str, hidden: int, quick: bool = False) -> Case:
    def build():
        from torch_geometric.nn import models

        torch.manual_seed(0)
        model = getattr(models, cls_name)(64, hidden, num_layers=2, out_channels=8)
        return model, _graph(34, 120, 64, 0), _graph(2000, 10000, 64, 1)

    return Case(name, "PyG", f"{cls_name} 64-{hidden}-8, 2000 nodes (torch_geometric)", build, quick)


def cases() -> list[Case]:
    """The zoo, in table order."""
    from istfx.models import GPT, ISTMLP, GPTConfig, PreActResNet, SmallCNN

    return [
        _ours("mlp_small", "ISTMLP 64-1024-1024-10", lambda: ISTMLP(64, [1024, 1024], 10), _vector(64), 128,
              quick=True),
        _ours("mlp", "ISTMLP 64-4096-4096-10 (the paper's)", lambda: ISTMLP(64, [4096, 4096], 10), _vector(64), 128),
        _ours("cnn", "SmallCNN width 64, 8x8", lambda: SmallCNN(1, 10, width=64), _image(1, 8), 128, quick=True),
        _ours("resnet18", "PreActResNet-18 width 32, 32x32", lambda: PreActResNet(18, 10, 3, width=32),
              _image(3, 32), 8),
        _ours("gpt", "GPT 4 layers, 8 heads, 256 wide, 128 tokens",
              lambda: GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=8, n_embd=256)),
              _tokens(256, 128), 8, quick=True),
        _hf("gpt2", quick=True),
        _hf("llama"),
        _hf("bert"),
        _hf("t5"),
        _hf("vit"),
        _pyg("gcn", "GCN", 256, quick=True),
        _pyg("graphsage", "GraphSAGE", 256),
        _pyg("gin", "GIN", 256),
    ]


# -- timing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def stage_timers() -> Any:
    """Time capture, axis analysis and subnet-template building inside ``istfx.compile`` (restored on exit)."""
    import istfx.core.compiler as compiler

    spent = {"capture": 0.0, "analysis": 0.0, "templates": 0.0}
    capture, run, template = compiler.capture, compiler.AxisAnalysis.run, compiler.SubnetTemplate

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        return wrapper

    compiler.capture = timed("capture", capture)
    compiler.AxisAnalysis.run = timed("analysis", run)
    compiler.SubnetTemplate = timed("templates", template)
    try:
        yield spent
    finally:
        compiler.capture, compiler.AxisAnalysis.run, compiler.SubnetTemplate = capture, run, template


def compile_timed(model: nn.Module, example: Inputs, subnets: int, **options) -> tuple[Any, dict]:
    """``istfx.compile`` with each stage's seconds: capture, analysis, plan, templates, total."""
    import istfx

    with stage_timers() as spent:
        start = time.perf_counter()
        ist = istfx.compile(model, subnets, example_inputs=example, **options)
        total = time.perf_counter() - start
    stages = dict(spent, total=total)
    stages["plan"] = total - spent["capture"] - spent["analysis"] - spent["templates"]
    return ist, stages


def _scalar(output: Any) -> torch.Tensor:
    """A scalar that depends on every floating output (a stand-in loss)."""
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in leaves)


def forward_backward(module: nn.Module, batch: Inputs) -> None:
    """One forward and backward pass of `module` on `batch`; gradients are dropped afterwards."""
    args, kwargs = batch
    _scalar(module(*args, **kwargs)).backward()
    for p in module.parameters():
        p.grad = None


def alternate(first: Callable[[], Any], second: Callable[[int], Any], repeats: int,
              floor: float = 0.02) -> tuple[list[float], list[float]]:
    """Seconds per call of `first()` and `second(k)`, run alternately `repeats` times.

    Alternating makes load drift hit both alike. A call shorter than `floor`
    seconds is repeated within one sample (at most 200 times) and the sample
    is the mean, so that timer and scheduler noise stay small against what
    is timed. `second` gets a new integer on every call.
    """
    calls = iter(range(1, 10 ** 9))

    def counts(fn: Callable[[], Any]) -> int:
        start = time.perf_counter()
        fn()
        return max(1, min(200, int(floor / max(time.perf_counter() - start, 1e-9)) + 1))

    run_second = lambda: second(next(calls))  # noqa: E731
    inner = (counts(first), counts(run_second))
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for side, fn in enumerate((first, run_second)):
            start = time.perf_counter()
            for _ in range(inner[side]):
                fn()
            samples[side].append((time.perf_counter() - start) / inner[side])
    return samples


def _median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def measure(case: Case, subnets: int = 4, compile_repeats: int = 3, repeats: int = 10) -> dict:
    """Every column of the table for `case` (see the module docstring); seconds are medians."""
    model, example, batch = case.build()
    model.train()
    row: dict[str, Any] = {"name": case.name, "family": case.family, "model": case.title, "subnets": subnets,
                           "parameters": sum(p.numel() for p in model.parameters())}
    runs = []
    for _ in range(compile_repeats):
        ist, stages = compile_timed(model, example, subnets, **case.options)
        runs.append(stages)
    row["compile_seconds"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row["compile_runs"] = runs  # the first one of the model pays the cold caches
    row["analysis_over_capture"] = _median_ratio([r["analysis"] for r in runs], [r["capture"] for r in runs])
    row["parameters_per_subnet"] = max(ist.plan.parameters_per_subnet)
    row["groups_split"] = len(ist.plan.split)
    row["templates"] = len(ist._templates)
    row["graph_nodes"] = len(ist.captured.module.graph.nodes)

    # One round against one clone of the whole state: rounds 1, 2, ... (round 0 warms caches).
    state = model.state_dict()
    ist.reassemble(ist.decompose(0))

    def clone_state() -> None:
        {k: v.clone() for k, v in state.items()}

    def one_round(k: int) -> None:
        ist.reassemble(ist.decompose(k))  # a new round every call: a new assignment

    clone, rounds = alternate(clone_state, one_round, repeats)
    row["clone_seconds"] = statistics.median(clone)
    row["round_seconds"] = statistics.median(rounds)
    row["round_over_clone"] = _median_ratio(rounds, clone)
    row["templates_after_rounds"] = len(ist._templates)

    # Forward + backward: the largest subnet against the full model, and the unsplit captured graph.
    parts = ist.decompose(10 ** 6)  # a round the timing above did not use
    sizes = [sum(p.numel() for p in s.parameters()) for s in parts]
    sub = parts[max(range(len(parts)), key=sizes.__getitem__)]
    graph = ist.captured.module
    for m in (model, sub, graph):  # warm-up: allocator, lazy kernels
        forward_backward(m, batch)
    full, part = alternate(lambda: forward_backward(model, batch), lambda k: forward_backward(sub, batch), repeats)
    full2, whole = alternate(lambda: forward_backward(model, batch), lambda k: forward_backward(graph, batch),
                             repeats)
    ist.reassemble(parts)
    row["full_step_seconds"] = statistics.median(full)
    row["subnet_step_seconds"] = statistics.median(part)
    row["subnet_over_full"] = _median_ratio(part, full)
    row["captured_graph_over_full"] = _median_ratio(whole, full2)
    row["subnet_parameter_share"] = max(sizes) / row["parameters"]
    return row


def _warm_up() -> None:
    """Compile a tiny model once, so that one-time imports and initialisation are charged to no row."""
    import istfx

    istfx.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 2, example_inputs=(torch.randn(2, 4),))


# -- the table --------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def markdown(rows: list[dict]) -> str:
    """The table of docs/benchmarks_compiler.md."""
    lines = [
        "| model | family | params | capture ms | analysis ms (x capture) | plan + subnet graphs ms "
        "| round: decompose + reassemble ms (x clone) | subnet fwd+bwd ms (x full) | captured graph x full "
        "| subnet params / full |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['family']} | - | failed: {r['error']} | | | | | | |")
            continue
        c = r["compile_seconds"]
        lines.append(
            f"| {r['model']} | {r['family']} | {r['parameters']:,} | {_ms(c['capture'])} "
            f"| {_ms(c['analysis'])} ({r['analysis_over_capture']:.2g}x) | {_ms(c['plan'] + c['templates'])} "
            f"| {_ms(r['round_seconds'])} ({r['round_over_clone']:.1f}x) "
            f"| {_ms(r['subnet_step_seconds'])} ({r['subnet_over_full']:.2f}x) "
            f"| {r['captured_graph_over_full']:.2f}x | {r['subnet_parameter_share']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from mdsection import write_section

    names = [c.name for c in cases()]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 smaller models, fewer repeats; writes nothing")
    parser.add_argument("--only", nargs="+", choices=names, help="just these models; writes nothing")
    parser.add_argument("--subnets", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs per measurement (10; 3 with --quick)")
    parser.add_argument("--compile-repeats", type=int, default=None, help="compiles per model (3; 1 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    selected = [c for c in cases() if (c.name in args.only if args.only else c.quick or not args.quick)]
    repeats = args.repeats or (3 if args.quick else 10)
    compile_repeats = args.compile_repeats or (1 if args.quick else 3)
    _warm_up()
    load_start = os.getloadavg()[0]
    rows = []
    for case in selected:
        start = time.perf_counter()
        try:
            row = measure(case, args.subnets, compile_repeats, repeats)
        except Exception as exc:  # the row records why a model could not be measured
            row = {"name": case.name, "family": case.family, "model": case.title,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        rows.append(row)
        print(f"{case.name:>10}: {time.perf_counter() - start:6.1f}s  "
              + (row.get("error") or f"round x clone {row['round_over_clone']:.1f}, "
                                    f"subnet x full {row['subnet_over_full']:.2f}"), file=sys.stderr, flush=True)
    load = (load_start, os.getloadavg()[0])
    header = (f"S = {args.subnets}, one torch thread, {compile_repeats} compile(s) and {repeats} timed pairs per "
              f"model (medians); load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores; "
              f"torch {torch.__version__}. Generated by `python benchmarks/compiler_costs.py`.")
    table = markdown(rows)
    print(header + "\n\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    if not args.quick and not args.only:
        (ROOT / "docs" / "compiler_costs.json").write_text(
            json.dumps({"header": header, "load_average": load, "rows": rows}, indent=1) + "\n")
        write_section(ROOT / "docs" / "benchmarks_compiler.md", "compiler_costs table", f"{header}\n\n{table}")
    return rows


if __name__ == "__main__":
    main()
