"""Human-readable plan: what is split, what is shared, sizes per subnet.

The table reads only what a plan holds (group roles included: the compiler
stores the describing pass's labels in ``plan.roles``), so this module
imports neither the plan module nor any pass.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

from istfx.core.interfaces import Block, RoleLabel
from istfx.core.groups import Group


class PlanView(Protocol):
    """What :func:`format_plan` reads; :class:`istfx.core.plan.Plan` has all of it."""

    subnets: int
    seed: int
    groups: list[Group]
    split: list[int]
    skipped: dict[int, str]
    diagnostics: Sequence[Any]
    parameters_full: int
    parameters_per_subnet: list[int]
    blocks: list[Block]
    shared_blocks: list[Block]
    min_depth: int | None
    depth_scaling: str
    roles: dict[int, RoleLabel]
    specialized: list[str]
    state_kinds: dict[str, str]
    state_shapes: dict[str, tuple[int, ...]]

    @property
    def keep_probability(self) -> float: ...

    def counts(self, group: Group) -> list[int]: ...

    def to_dict(self) -> dict: ...


def format_plan(plan: PlanView) -> str:
    """A compact text table of a plan, as ``print(ist.plan)`` and ``istfx inspect`` show it."""
    lines = [f"IST plan: {plan.subnets} subnets, policy={plan.to_dict()['policy']}, seed={plan.seed}"]
    per = plan.parameters_per_subnet
    if per:
        full = plan.parameters_full or 1
        shown = ", ".join(f"{p:,}" for p in per[:8]) + (" ..." if len(per) > 8 else "")
        lines.append(f"parameters: full {plan.parameters_full:,}; per subnet {shown} "
                     f"({max(per) / full:.1%} of full at most)")
    lines.append("")
    lines.append(f"{'group':>6}  {'units':>6}  {'status':<11}  {'role':<14}  {'decision':<28}  members")
    for g in plan.groups:
        if g.id in plan.split:
            counts = plan.counts(g)
            decision = f"split {'/'.join(map(str, counts[:4]))}{'/...' if len(counts) > 4 else ''}"
        else:
            decision = "shared"
        members = ", ".join(str(m) for m in g.members[:3]) + (f", +{len(g.members) - 3}" if len(g.members) > 3 else "")
        role = plan.roles[g.id].name if g.id in plan.roles else ""
        lines.append(f"{'g' + str(g.id):>6}  {g.units:>6}  {g.status:<11}  {role:<14}  {decision[:28]:<28}  {members}")
        why = g.reasons[0] if g.status != "exact" and g.reasons else plan.skipped.get(g.id)
        if why:
            lines.append(f"{'':>6}  {'':>6}  {'':<11}  {'':<14}  why: {why}")
    if plan.blocks or plan.shared_blocks:
        lines.append("")
        p = plan.keep_probability
        lines.append(f"residual blocks: {len(plan.blocks)} dealt out (p={p:.3f}, min_depth={plan.min_depth}, "
                     f"scaling at {plan.depth_scaling}), {len(plan.shared_blocks)} kept in every subnet")
        for b in plan.blocks:
            count = sum(math.prod(plan.state_shapes[n]) for n in b.parameters if plan.state_kinds.get(n) == "parameter")
            lines.append(f"  drop  {b.name}: {count:,} parameters, {len(b.branches)} branch(es)")
        for b in plan.shared_blocks:
            lines.append(f"  keep  {b.name}: {b.reason or 'not selected'}")
    if plan.specialized:
        lines.append("")
        lines.append("static input dims (subnets accept only these sizes) and other limits:")
        lines.extend(f"  - {line}" for line in plan.specialized)
    if plan.diagnostics:
        lines.append("")
        lines.append(f"diagnostics ({len(plan.diagnostics)} op(s) without a rule; their axes are frozen):")
        lines.extend(f"  - {d}" for d in plan.diagnostics)
    return "\n".join(lines)
