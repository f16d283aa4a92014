"""Per-subnet parameters and forward FLOPs of a PreActResNet-101 cut by ResIST, at S = 2, 4, 8.

    python benchmarks/resnet_costs.py                 # the table in docs/resist.md (~3 min)
    python benchmarks/resnet_costs.py --subnets 4 --width 16

Decompositions, each against the full model (CIFAR-10 shape: 3x32x32 input,
10 classes, width 64):

- depth, all sections: every block with an identity skip is dealt out
  (``blocks="*"``, ``width=False``); the 4 blocks with a projection
  shortcut, the stem and the head are in every subnet;
- depth, section 3: only ``layer3``'s blocks are dealt out (the paper's choice);
- depth + width: every block dealt out and the channels split as well.

Parameters count what a subnet holds (and would receive). FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of the
subnet's graph at batch 1 (convolutions and matrix products; BatchNorm and
ReLU are not counted). Subnets differ by the blocks they hold; the table shows
the range over the S subnets of round 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import istfx
from istfx.models import PreActResNet

DECOMPOSITIONS = {
    "depth, all sections": dict(blocks="*", width=False),
    "depth, section 3": dict(blocks="layer3.*", width=False),
    "depth + width": dict(blocks="*", width=True),
}


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def costs(args, subnets: int, name: str, options: dict, full_flops: int) -> dict:
    torch.manual_seed(0)
    model = PreActResNet(args.depth, num_classes=10, in_channels=3, width=args.width)
    x = torch.randn(1, 3, args.side, args.side)
    start = time.perf_counter()
    ist = istfx.compile(model, subnets=subnets, example_inputs=(torch.randn(2, 3, args.side, args.side),), **options)
    parts = ist.decompose(0)
    params = [sum(p.numel() for p in sub.parameters()) for sub in parts]
    assert params == ist.subnet_parameter_counts(0)
    flops = [forward_flops(sub, x) for sub in parts]
    held = ist.plan.block_assignment(0)
    return {
        "decomposition": name, "subnets": subnets, "options": options,
        "blocks_dealt": len(ist.plan.blocks), "blocks_shared": len(ist.plan.shared_blocks),
        "blocks_held": [len(h) for h in held],
        "parameters_full": ist.plan.parameters_full, "parameters": params,
        "flops_full": full_flops, "flops": flops,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _range(values: list[float], scale: float, fmt: str) -> str:
    """'lo–hi' over subnets (one number when they agree at this precision)."""
    lo, hi = min(values) / scale, max(values) / scale
    return format(lo, fmt) if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}"


def table(results: list[dict]) -> str:
    full = results[0]
    lines = [
        "| decomposition | S | blocks held | parameters (M) | of full | forward GFLOPs | of full |",
        "|---|---|---|---|---|---|---|",
        f"| full model | 1 | {full['blocks_dealt'] + full['blocks_shared']} | "
        f"{full['parameters_full'] / 1e6:.2f} | 100% | {full['flops_full'] / 1e9:.2f} | 100% |",
    ]
    for r in results:
        pf, ff = r["parameters_full"], r["flops_full"]
        lines.append(
            f"| {r['decomposition']} | {r['subnets']} | {_range(r['blocks_held'], 1, '.0f')} "
            f"(+{r['blocks_shared']} shared) | {_range(r['parameters'], 1e6, '.2f')} | "
            f"{_range([p / pf * 100 for p in r['parameters']], 1, '.1f')}% | {_range(r['flops'], 1e9, '.2f')} | "
            f"{_range([f / ff * 100 for f in r['flops']], 1, '.1f')}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--side", type=int, default=32, help="input images are side x side")
    parser.add_argument("--subnets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="docs/resnet_costs.json", help="write the results here")
    parser.add_argument("--render", action="store_true", help="only print the table of an earlier run's --json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        print(table(saved["results"]))
        print(f"\n{saved['command']}; results in {args.json}")
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    torch.manual_seed(0)
    full = PreActResNet(args.depth, num_classes=10, in_channels=3, width=args.width)
    full_flops = forward_flops(full.eval(), torch.randn(1, 3, args.side, args.side))
    results = []
    for name, options in DECOMPOSITIONS.items():
        for s in args.subnets:
            results.append(costs(args, s, name, options, full_flops))
            r = results[-1]
            print(f"{name:<22} S={s}: parameters {min(r['parameters']):,}-{max(r['parameters']):,} of "
                  f"{r['parameters_full']:,}; GFLOPs {min(r['flops']) / 1e9:.2f}-{max(r['flops']) / 1e9:.2f} of "
                  f"{full_flops / 1e9:.2f} ({r['seconds']}s)", file=sys.stderr, flush=True)
    command = "python " + " ".join(sys.argv)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "model": f"PreActResNet-{args.depth}", "width": args.width,
                                "input": [1, 3, args.side, args.side], "torch": torch.__version__,
                                "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"\n{command}; results in {path}")


if __name__ == "__main__":
    main()
