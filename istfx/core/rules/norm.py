"""Normalisations, reductions and scans: axes normalised or reduced over are approximate."""
from __future__ import annotations



from .context import OpContext, _dim_list, _norm_dim
from .reshape import _rewrite_size_list


def rule_batch_norm(ctx: OpContext) -> None:
    x = ctx.axes("input")
    channel = x[1] if len(x) > 1 else x[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        if ctx.arg(name) is not None:
            ctx.same(channel, ctx.axes(name)[0])
    for a in x:
        if a is not channel:
            ctx.approximate(a, "normalised over")
    n_out = len(ctx.node.meta["val"]) if isinstance(ctx.node.meta.get("val"), (tuple, list)) else 0
    if n_out:  # native_batch_norm & co: (out, mean, invstd, ...)
        outs = [list(x)]
        for k in range(1, n_out):
            outs.append([channel] if ctx.out_dims(k) == [ctx.dim(channel)] else ctx.fresh(ctx.out_dims(k)))
        ctx.output(outs)
    else:
        ctx.output(list(x))


def rule_layer_norm(ctx: OpContext) -> None:
    x = ctx.axes("input")
    shape = ctx.arg("normalized_shape")
    k = len(shape)
    normed = x[len(x) - k:]
    for name in ("weight", "bias"):
        if ctx.arg(name) is not None:
            for a, b in zip(normed, ctx.axes(name)):
                ctx.same(a, b)
    for a in normed:
        ctx.approximate(a, "normalised over")
    ctx.rewrite(_rewrite_size_list("normalized_shape", normed))
    ctx.output(_with_statistics(ctx, x, len(x) - k))


def rule_rms_norm(ctx: OpContext) -> None:
    rule_layer_norm(ctx)


def rule_group_norm(ctx: OpContext) -> None:
    x = ctx.axes("input")
    for name in ("weight", "bias"):
        if ctx.arg(name) is not None:
            ctx.same(x[1], ctx.axes(name)[0])
    for a in x[1:]:
        ctx.approximate(a, "normalised over")
    ctx.freeze(x[1], "channels normalised in groups")
    ctx.output(_with_statistics(ctx, x, 1))


def _with_statistics(ctx: OpContext, x: list[int], lead: int) -> list:
    """The output axes, and for the native_* variants (out, mean, rstd) the statistics' axes too.

    The statistics keep the input's `lead` leading axes; their other axes (per group, or
    size 1) are frozen.
    """
    val = ctx.node.meta.get("val")
    if not isinstance(val, (tuple, list)):
        return list(x)
    outs = [list(x)]
    for k in range(1, len(val)):
        stats = ctx.fresh(ctx.out_dims(k))
        for a, b in zip(stats[:lead], x[:lead]):
            ctx.same(a, b)
        for a in stats[lead:]:
            ctx.freeze(a, "normalisation statistics")
        outs.append(stats)
    return outs


def rule_softmax(ctx: OpContext) -> None:
    x = ctx.axes("self")
    ctx.approximate(x[_norm_dim(ctx.arg("dim"), len(x))], "softmax over")
    ctx.output(list(x))


def rule_reduce(ctx: OpContext) -> None:
    """sum/mean/amax/var/...: reduced axes are approximate, kept ones pass through."""
    x = ctx.axes("self")
    dim_arg = next((ctx.arg(n) for n in ("dim", "dims") if n in ctx.bound), None)
    reduced = set(_dim_list(dim_arg, len(x)))
    keep = bool(ctx.arg("keepdim", False))
    out = []
    for i, a in enumerate(x):
        if i in reduced:
            ctx.approximate(a, "reduced over")
            if keep:
                out.append(ctx.alg.new(1))
        else:
            out.append(a)
    val = ctx.node.meta.get("val")
    ctx.output([out, list(out)] if isinstance(val, (tuple, list)) else out)


def rule_scan(ctx: OpContext) -> None:
    """cumsum/cumprod/sort/argsort/topk: positions along `dim` matter."""
    x = ctx.axes("self")
    if "dims" in ctx.bound:  # flip, roll: several axes (roll without dims: the flattened tensor)
        out = ctx.fresh(ctx.out_dims())
        ctx.broadcast(out, [x])
        for d in _dim_list(ctx.arg("dims") or None, len(x)):
            ctx.freeze(x[d], "order along this axis matters")
        ctx.output(out)
        return
    d = _norm_dim(ctx.arg("dim", -1), len(x))
    ctx.freeze(x[d], "order along this axis matters")
    val = ctx.node.meta.get("val")
    if isinstance(val, (tuple, list)):
        outs = []
        for k in range(len(val)):
            o = list(x[:d]) + ctx.fresh(ctx.out_dims(k)[d:d + 1]) + list(x[d + 1:])
            for a in o:
                ctx.freeze(a, "order along this axis matters") if a == o[d] else None
            outs.append(o)
        ctx.output(outs)
    else:
        out = ctx.fresh(ctx.out_dims())
        ctx.broadcast(out, [x])
        ctx.freeze(out[d], "order along this axis matters")
        ctx.output(out)
