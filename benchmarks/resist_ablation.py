"""The ResIST ablation on scikit-learn digits upsampled to 16x16, with 2 and 4 subnets.

    python benchmarks/resist_ablation.py                  # the run behind docs/resist.md (~16 min, 2 cores)
    python benchmarks/resist_ablation.py --quick          # a smoke run (~3 min): 4 epochs, one seed
    python benchmarks/resist_ablation.py --subnets 2 --epochs 10 --seeds 0 1

Each row adds one step of the ResIST paper's ablation to the row above it
(depth only: ``width=False``):

1. naive: post-activation ResNet, every block dealt out, strided/projection
   blocks too (keeping their shortcut path), no scaling;
2. + share strided blocks (``shortcut_blocks="share"``);
3. + partition one section only (``blocks="layer3.*"``, the longest);
4. + scale activations (``depth_scaling="eval"``: branches times p at evaluation);
5. + pre-activation blocks (``PreActResNet``);
6. + minimum depth (``min_depth``: blocks overlap and are averaged).

Every run, the full-model baselines included, trains with ``istfx.fit`` on
the local backend for the same number of epochs (counted in samples over all
subnets), from the same initial weights per model family, with the same
optimizer (a fresh SGD with momentum per subnet per round, learning rate
divided by 10 for the last quarter of the rounds). The baselines are the
same models compiled with one subnet that holds every block. Test accuracy is
measured on the full model after the last round (under
``ist.inference_scaling()``, as ``fit`` evaluates).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import istfx
from istfx.runtime.data import digits, loaders
from istfx.models import PreActResNet, ResNet

MODELS = {"ResNet": ResNet, "PreActResNet": PreActResNet}


def rows(min_depth: int) -> dict[str, tuple[str, str, dict]]:
    """key -> (row name, model family, compile options).

    The first six are the ablation, each adding one step to the row above;
    the last two apply the scaling step out of order, straight to the naive
    rows (``--rows naive+scale share+scale``).
    """
    naive = dict(blocks="*", shortcut_blocks="drop", depth_scaling="none")
    share = dict(naive, shortcut_blocks="share")
    section = dict(share, blocks="layer3.*")
    scaled = dict(section, depth_scaling="eval")
    return {
        "naive": ("naive decomposition", "ResNet", naive),
        "share": ("+ share strided blocks", "ResNet", share),
        "section": ("+ partition section 3 only", "ResNet", section),
        "scale": ("+ scale activations", "ResNet", scaled),
        "preact": ("+ pre-activation blocks", "PreActResNet", scaled),
        "min-depth": (f"+ minimum depth {min_depth}", "PreActResNet", dict(scaled, min_depth=min_depth)),
        "naive+scale": ("naive + scale activations", "ResNet", dict(naive, depth_scaling="eval")),
        "share+scale": ("naive + share strided + scale activations", "ResNet", dict(share, depth_scaling="eval")),
    }


ABLATION = ["naive", "share", "section", "scale", "preact", "min-depth"]


def data(side: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Digits as ``[N, 1, side, side]`` images (bilinear upsampling), standardised with training statistics."""
    train, test = digits(seed=seed, image=True)
    x_train, x_test = (F.interpolate(d.tensors[0], size=(side, side), mode="bilinear", align_corners=False)
                       for d in (train, test))
    mean, std = x_train.mean(), x_train.std()
    return (TensorDataset((x_train - mean) / std, train.tensors[1]),
            TensorDataset((x_test - mean) / std, test.tensors[1]))


def run(family: str, subnets: int, options: dict, args, seed: int, train, test) -> dict:
    torch.manual_seed(seed)
    model = MODELS[family](args.depth, num_classes=10, in_channels=1, width=args.width)
    train_loader, test_loader = loaders(train, test, batch_size=args.batch_size, seed=seed, drop_last=True)
    start = time.perf_counter()
    ist = istfx.compile(model, subnets=subnets, example_inputs=(train.tensors[0][:2],), width=False,
                        seed=seed, **options)
    compile_seconds = time.perf_counter() - start
    steps_per_round = subnets * args.local_steps
    rounds = max(1, math.ceil(args.epochs * len(train) / (steps_per_round * args.batch_size)))
    decay_at = math.ceil(0.75 * rounds)
    calls = [0]

    def optimizer(params):
        round = calls[0] // subnets  # fit asks for one optimizer per subnet per round, in order
        calls[0] += 1
        lr = args.lr if round < decay_at else args.lr / 10
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)

    start = time.perf_counter()
    history = istfx.fit(ist, train_loader, rounds=rounds, local_steps=args.local_steps, optimizer=optimizer,
                        eval_data=test_loader, eval_every=rounds, progress=False)
    plan = ist.plan
    return {
        "accuracy": history.last["eval_accuracy"],
        "train_accuracy": history.last["train_accuracy"],
        "epochs": history.last["epochs"],
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
        "compile_seconds": compile_seconds,
        "blocks_dealt": len(plan.blocks),
        "blocks_shared": len(plan.shared_blocks),
        "keep_probability": plan.keep_probability,
        "parameters_full": plan.parameters_full,
        "parameters_per_subnet_mean": statistics.fmean(
            statistics.fmean(r["parameters_per_subnet"]) for r in history),
    }


def table(results: list[dict]) -> str:
    """The markdown table: one line per row, one column per S (mean test accuracy over seeds)."""
    subnets = sorted({r["subnets"] for r in results if r["subnets"] > 1})
    by = {(r["row"], r["model"], r["subnets"]): r for r in results}
    names = list(dict.fromkeys((r["row"], r["model"]) for r in results))
    head = "| row | model | " + " | ".join(f"S = {s}" for s in subnets) + " |"
    lines = [head, "|" + "---|" * (2 + len(subnets))]
    for name, family in names:
        cells = []
        for s in subnets or [1]:
            r = by.get((name, family, s)) or by.get((name, family, 1))
            if r is None:
                cells.append("")
                continue
            acc = r["accuracy"]
            text = f"{100 * statistics.fmean(acc):.1f}%"
            if len(acc) > 1:
                text += f" ± {100 * statistics.stdev(acc):.1f}"
            if r["subnets"] > 1:
                text += f" (p={r['keep_probability']:.2f}, {r['parameters_per_subnet_mean'] / r['parameters_full']:.0%})"
            cells.append(text)
        lines.append(f"| {name} | {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs, one seed")
    parser.add_argument("--subnets", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--depth", type=int, default=34, help="ResNet depth (34: sections of 3/4/6/3 blocks)")
    parser.add_argument("--width", type=int, default=16, help="channels of the stem and the first section")
    parser.add_argument("--side", type=int, default=16, help="images are upsampled to side x side")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per run (default 15, quick 4)")
    parser.add_argument("--local-steps", type=int, default=10, help="SGD steps per subnet per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--min-depth", type=int, default=3, help="the minimum-depth row's min_depth")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument("--rows", nargs="+", default=ABLATION, choices=list(rows(0)),
                        help="which rows to run (default: the six of the ablation)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="leave out the full-model runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these sizes)")
    parser.add_argument("--json", default=None, help="write the results here (default: docs/resist_ablation"
                                                     "[_quick].json)")
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else (4.0 if args.quick else 15.0)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    plan = [("full model", family, 1, dict(blocks="*")) for family in MODELS] if args.baseline else []
    table_rows = rows(args.min_depth)
    for s in args.subnets:
        for key in args.rows:
            name, family, options = table_rows[key]
            plan.append((name, family, s, options))
    results = []
    total = time.perf_counter()
    for name, family, subnets, options in plan:
        per_seed = []
        for seed in seeds:
            train, test = data(args.side, seed)
            per_seed.append(run(family, subnets, options, args, seed, train, test))
            r = per_seed[-1]
            print(f"S={subnets} {name:<28} {family:<13} seed {seed}: test {r['accuracy']:.4f} "
                  f"(train {r['train_accuracy']:.3f}, {r['rounds']} rounds, {r['seconds']:.0f}s)",
                  file=sys.stderr, flush=True)
        results.append({
            "row": name, "model": family, "subnets": subnets,
            "options": {k: v for k, v in options.items()},
            "accuracy": [r["accuracy"] for r in per_seed],
            **{k: per_seed[0][k] for k in ("keep_probability", "blocks_dealt", "blocks_shared", "parameters_full",
                                           "rounds", "epochs")},
            "parameters_per_subnet_mean": statistics.fmean(r["parameters_per_subnet_mean"] for r in per_seed),
            "seconds": [round(r["seconds"], 1) for r in per_seed],
        })
    command = "python " + " ".join(sys.argv)
    report = {
        "command": command,
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"seeds": seeds},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "threads": args.threads},
        "total_seconds": round(time.perf_counter() - total, 1),
        "results": results,
    }
    path = Path(args.json or f"docs/resist_ablation{'_quick' if args.quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\n{command}: {report['total_seconds']:.0f}s; results in {path}")


if __name__ == "__main__":
    main()
