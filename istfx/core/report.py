"""Human-readable plan: what is split, what is shared, sizes per subnet."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from istfx.core.plan import Plan


def format_plan(plan: "Plan") -> str:
    """A compact text table of a plan, as ``print(ist.plan)`` and ``istfx inspect`` show it."""
    lines = [f"IST plan: {plan.subnets} subnets, policy={plan.to_dict()['policy']}, seed={plan.seed}"]
    per = plan.parameters_per_subnet
    if per:
        full = plan.parameters_full or 1
        shown = ", ".join(f"{p:,}" for p in per[:8]) + (" ..." if len(per) > 8 else "")
        lines.append(f"parameters: full {plan.parameters_full:,}; per subnet {shown} "
                     f"({max(per) / full:.1%} of full at most)")
    lines.append("")
    from istfx.passes.heads import describe  # passes build on the core, import late

    roles = {gid: role.name for gid, role in describe(plan).items()}
    lines.append(f"{'group':>6}  {'units':>6}  {'status':<11}  {'role':<14}  {'decision':<28}  members")
    for g in plan.groups:
        if g.id in plan.split:
            counts = plan.counts(g)
            decision = f"split {'/'.join(map(str, counts[:4]))}{'/...' if len(counts) > 4 else ''}"
        else:
            decision = "shared"
        members = ", ".join(str(m) for m in g.members[:3]) + (f", +{len(g.members) - 3}" if len(g.members) > 3 else "")
        role = roles.get(g.id, "")
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
            lines.append(f"  drop  {b.module or '<root>'}: {count:,} parameters, {len(b.branches)} branch(es)")
        for b in plan.shared_blocks:
            lines.append(f"  keep  {b.module or '<root>'}: {b.reason or 'not selected'}")
    if plan.diagnostics:
        lines.append("")
        lines.append(f"diagnostics ({len(plan.diagnostics)} op(s) without a rule; their axes are frozen):")
        lines.extend(f"  - {d}" for d in plan.diagnostics)
    return "\n".join(lines)
