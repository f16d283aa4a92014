"""Mixture-of-experts kernels: grouped matmuls over rows sorted by expert, and the histogram that counts them.

Hugging Face's ``grouped_mm`` experts implementation sorts the (token, expert)
rows by expert, counts them per expert with ``histc`` and multiplies each run
of rows by its expert's matrix. Which expert a row meets is data, so the
experts axis is frozen; the matrices' other two axes are an ordinary
contraction and output, the same for every expert, so the experts' hidden
units are cut like an FFN's.
"""
from __future__ import annotations

from .context import OpContext


def rule_grouped_mm(ctx: OpContext) -> None:
    """grouped_mm(input [S, K], weight [E, K, N], offs [E]) -> [S, N]: rows of run e times weight[e]."""
    values = list(ctx.bound.values())
    x, w = ctx.axes(values[0]), ctx.axes(values[1])
    if len(x) != 2 or len(w) != 3:
        raise ValueError(f"grouped matmul of a {len(x)}-d input and a {len(w)}-d weight has no axis rule")
    ctx.same(x[1], w[1])  # contraction, expert by expert
    ctx.freeze(w[0], "expert chosen per row by data")
    offs = values[2] if len(values) > 2 else None
    if offs is not None and ctx.is_tensor(offs):
        for a in ctx.axes(offs):
            ctx.freeze(a, "expert chosen per row by data")
    ctx.output([x[0], w[2]])


def rule_histc(ctx: OpContext) -> None:
    """histc: counts of values per bin; the bins are no axis of the input."""
    for a in ctx.axes("self"):
        ctx.freeze(a, "counted by a histogram")
    out = ctx.fresh(ctx.out_dims())
    for a in out:
        ctx.freeze(a, "histogram bins")
    ctx.output(out)
