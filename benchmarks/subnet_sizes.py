"""Per-subnet parameter counts of the IST paper's wide MLPs at S = 2, 4, 8.

    python benchmarks/subnet_sizes.py [--width 4096] [--features 64] [--classes 35]

Hidden layers must shrink by S: a 4096-wide layer gives each subnet 4096/S
neurons, so a hidden-to-hidden weight shrinks by S^2, and the first and last
layers by S.
"""
from __future__ import annotations

import argparse
import json

import torch

import istfx
from istfx.models import ISTMLP


def sizes(features: int, hidden: list[int], classes: int, subnets: int) -> dict:
    model = ISTMLP(features, hidden, classes)
    ist = istfx.compile(model, subnets=subnets, example_inputs=(torch.randn(4, features),))
    sub = ist.decompose(0)[0]
    widths = [sub.get_parameter(f"layers.{3 * i}.weight").shape[0] for i in range(len(hidden))]
    return {
        "hidden": hidden, "subnets": subnets,
        "full_parameters": sum(p.numel() for p in model.parameters()),
        "subnet_parameters": ist.plan.parameters_per_subnet,
        "subnet_hidden_widths": widths,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=35)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    rows = [sizes(args.features, [args.width] * layers, args.classes, s) for layers in (1, 2) for s in (2, 4, 8)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'hidden':>14} {'S':>2} {'full params':>12} {'per subnet':>11} {'ratio':>6}  hidden width per subnet")
    for r in rows:
        per = max(r["subnet_parameters"])
        print(f"{'x'.join(map(str, r['hidden'])):>14} {r['subnets']:>2} {r['full_parameters']:>12,} {per:>11,} "
              f"{per / r['full_parameters']:>6.3f}  {r['subnet_hidden_widths']}")


if __name__ == "__main__":
    main()
