"""Elementwise, creation and bookkeeping ops, and the fallback that freezes unknown ops."""
from __future__ import annotations


import torch

from .context import OpContext, _flat_values, dims, op_name
from .reshape import _rewrite_size_list


def rule_pointwise(ctx: OpContext) -> None:
    """Elementwise op with broadcasting; scalars and non-tensors are ignored."""
    tensors = [v for v in _flat_values(ctx.bound) if ctx.is_tensor(v)]
    val = ctx.node.meta.get("val")
    tuple_out = isinstance(val, (tuple, list))  # native_dropout: (output, mask), both shaped like the output
    out = ctx.fresh(ctx.out_dims(0 if tuple_out else None))
    ctx.broadcast(out, [ctx.axes(t) for t in tensors])
    ctx.output([list(out) for _ in val] if tuple_out else out)


def rule_identity(ctx: OpContext) -> None:
    """Output has the input's axes (copies, casts, in-place ops on `self`)."""
    first = next(iter(ctx.bound.values()))
    ctx.output(list(ctx.axes(first)))


def rule_no_output(ctx: OpContext) -> None:
    ctx.output(None)


def rule_creation(ctx: OpContext) -> None:
    """zeros/ones/full/empty/new_*: constant values; sizes follow the axes they meet."""
    out = ctx.fresh(ctx.out_dims())
    if "self" in ctx.bound and op_name(ctx.node).endswith("_like"):
        ctx.broadcast(out, [ctx.axes("self")])
    name = next((n for n in ("size", "shape") if n in ctx.bound), None)
    if name is not None and isinstance(ctx.arg(name), (list, tuple)):
        ctx.rewrite(_rewrite_size_list(name, out))
    ctx.output(out)


def rule_positions(ctx: OpContext) -> None:
    """arange/tril/triu/eye: values depend on the position along an axis."""
    out = ctx.fresh(ctx.out_dims())
    for a in out:
        ctx.freeze(a, "values are positions")
    if "self" in ctx.bound and ctx.is_tensor(ctx.arg("self")):
        ctx.broadcast(out, [ctx.axes("self")])
    ctx.output(out)


def rule_arange(ctx: OpContext) -> None:
    """arange of a static length from plain numbers: a constant whose values are positions.

    ``slopes = base ** arange(1, n + 1)`` (ALiBi, one slope per head): a subnet
    holding heads {0, 2} needs the values at positions {0, 2}, i.e. the full
    arange sliced by the held indices. So the output axis is an ordinary axis,
    and the analysis stores the arange as a constant sliced with it
    (:meth:`OpContext.as_constant`). An arange over a dynamic size (sequence
    positions) or from tensor values stays frozen: its values follow the input.
    """
    out_dims = ctx.out_dims()
    numbers = all(isinstance(ctx.arg(k), (int, float)) for k in ("start", "end", "step") if k in ctx.bound)
    if not numbers or any(not isinstance(d, int) for d in out_dims):
        rule_positions(ctx)
        return
    ctx.output(ctx.fresh(out_dims))
    ctx.as_constant()


def rule_copy(ctx: OpContext) -> None:
    x = ctx.axes("self")
    ctx.broadcast(x, [ctx.axes("src")])
    ctx.output(list(x))


def rule_getitem(ctx: OpContext) -> None:
    seq, i = ctx.node.args
    items = ctx.axes_of(seq)
    ctx.output(items[i] if items is not None else None)


def rule_prelu(ctx: OpContext) -> None:
    x, w = ctx.axes("self"), ctx.axes("weight")
    if ctx.dim(w[0]) != 1:
        ctx.same(x[1] if len(x) > 1 else x[0], w[0])
    ctx.output(list(x))


def rule_unknown(ctx: OpContext, why: str = "no axis rule for this op") -> None:
    """Freeze every axis an op touches; the analysis reports it with its source line."""
    for v in _flat_values(ctx.bound):
        if ctx.is_tensor(v):
            for a in ctx.axes(v):
                ctx.alg.freeze(a, f"{why}: {op_name(ctx.node)}")
    val = ctx.node.meta.get("val")
    if isinstance(val, (tuple, list)):
        outs = []
        for k, v in enumerate(val):
            outs.append(ctx.fresh(dims(v)) if isinstance(v, torch.Tensor) else None)
        ctx.output(outs)
    elif isinstance(val, torch.Tensor):
        ctx.output(ctx.fresh(ctx.out_dims()))
    else:
        ctx.output(None)
    for group in ctx.outputs if isinstance(val, (tuple, list)) else [ctx.outputs]:
        for a in group or []:
            ctx.alg.freeze(a, f"{why}: {op_name(ctx.node)}")
