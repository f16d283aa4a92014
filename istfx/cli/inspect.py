"""``istfx inspect``: compile a model file and show the plan.

Prints the plan table (which coupled-axis groups are split across subnets,
which are shared and why, each group's role), the ops without an axis rule
and the parameters of each subnet; ``--json`` prints the same as one JSON
document (nothing else goes to stdout), ``--graph out.svg`` draws the
captured graph coloured by split group. When nothing can be split the plan
still prints, with the reason on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from istfx.cli.loader import load_model_file
from istfx.cli.options import compile_kwargs
from istfx.errors import ISTError, NothingToSplitError

__all__ = ["parameter_table", "plan_report", "run"]

_MAX_SUBNET_ROWS = 16


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run ``istfx inspect`` for parsed `args`; returns the exit status."""
    import istfx

    graph_path = Path(args.graph) if args.graph else None
    if graph_path is not None and not graph_path.parent.is_dir():
        raise ISTError(f"--graph: folder {graph_path.parent} does not exist; create it or write elsewhere")

    # Anything the model file or the compiler prints goes to stderr: stdout is the report.
    note = None
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_model_file(args.model)
        try:
            ist = istfx.compile(loaded.model, example_inputs=loaded.example_inputs, **compile_kwargs(args))
            plan = ist.plan
        except NothingToSplitError as exc:  # still a plan worth showing: it says why
            if exc.plan is None:
                raise
            ist, plan, note = None, exc.plan, exc.reason
        if graph_path is not None:
            if ist is None:
                raise ISTError("--graph: nothing is split, so the graph would have no colours; "
                               f"see the plan without --graph ({note})")
            from istfx.draw.graphview import plan_graph_svg

            graph_path.write_text(plan_graph_svg(ist), encoding="utf-8")
            print(f"istfx: wrote the graph to {graph_path}", file=sys.stderr)

    if args.json:
        print(json.dumps(plan_report(plan, loaded.name), indent=2))
    else:
        print(f"model: {loaded.name} ({args.model})")
        print(plan)
        print()
        print(parameter_table(plan))
    if note:
        print(f"istfx: note: {note}", file=sys.stderr)
    return 0


def plan_report(plan, model_name: str) -> dict:
    """The ``--json`` document: the plan's data, each group's role, the model's name and parameter counts."""
    from istfx.passes import roles

    report = plan.to_dict()
    role_of = roles(plan)
    for group in report["groups"]:
        group.setdefault("role", role_of.get(group["id"]))
    report["model"] = model_name
    report["split_any"] = bool(plan.split or plan.blocks)
    report["parameters_full"] = plan.parameters_full
    report["parameters_per_subnet"] = list(plan.parameters_per_subnet)
    return report


def parameter_table(plan) -> str:
    """Parameters per subnet against the full model, one row per subnet (long lists are cut short)."""
    full = plan.parameters_full
    per = list(plan.parameters_per_subnet)
    lines = [f"{'subnet':>6}  {'parameters':>12}  {'of full':>8}"]
    for s, count in enumerate(per[:_MAX_SUBNET_ROWS]):
        lines.append(f"{s:>6}  {count:>12,}  {count / max(full, 1):>8.1%}")
    if len(per) > _MAX_SUBNET_ROWS:
        lines.append(f"{'...':>6}  {len(per) - _MAX_SUBNET_ROWS} more, {min(per):,} to {max(per):,} parameters")
    lines.append(f"{'full':>6}  {full:>12,}  {1:>8.1%}")
    return "\n".join(lines)
