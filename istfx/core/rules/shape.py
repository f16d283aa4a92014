"""Shape ops: views, transposes, broadcasting, cat/split/slice with offsets, pooling, padding."""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.fx as fx

from ..axes import CONCAT, PRODUCT, SELECTED, SPATIAL
from .context import OpContext, Sym, _dim_list, _norm_dim, dims, new_atom, op_name, set_arg
from .reshape import _rewrite_size_list, reshape_axes


def rule_view(ctx: OpContext) -> None:
    x = ctx.axes("self")
    out = reshape_axes(ctx, x, ctx.out_dims())
    name = "size" if "size" in ctx.bound else "shape"
    if name in ctx.bound:
        ctx.rewrite(_rewrite_size_list(name, out, out_dims=ctx.out_dims()))
    ctx.output(out)


def rule_reshape_like(ctx: OpContext) -> None:
    """flatten/unflatten/view_as/reshape_as: a reshape whose sizes live elsewhere."""
    x = ctx.axes("self") if "self" in ctx.bound else ctx.axes(next(iter(ctx.bound.values())))
    out = reshape_axes(ctx, x, ctx.out_dims())
    if "sizes" in ctx.bound:  # unflatten: `dim` counts the input's axes (-1 is the input's last)
        ctx.rewrite(_rewrite_size_list("sizes", out, offset=_norm_dim(ctx.arg("dim"), len(x)),
                                       out_dims=ctx.out_dims()))
    if "other" in ctx.bound:  # view_as: the other tensor's axes are the output's
        for a, b in zip(out, ctx.axes("other")):
            ctx.same(a, b)
    ctx.output(out)


def rule_squeeze(ctx: OpContext) -> None:
    x = ctx.axes("self")
    dim = ctx.arg("dim")
    candidates = range(len(x)) if dim is None else _dim_list(dim, len(x))
    dropped = {d for d in candidates if ctx.dim(x[d]) == 1}
    ctx.output([a for i, a in enumerate(x) if i not in dropped])


def rule_unsqueeze(ctx: OpContext) -> None:
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x) + 1)
    ctx.output([*x[:d], ctx.alg.new(1), *x[d:]])


def rule_transpose(ctx: OpContext) -> None:
    x = list(ctx.axes("self"))
    if len(x) < 2:
        ctx.output(x)
        return
    if "dim0" not in ctx.bound and "axis0" not in ctx.bound:  # t, numpy_T: all axes reversed
        ctx.output(x[::-1])
        return
    d0 = _norm_dim(ctx.arg("dim0", ctx.arg("axis0")), len(x))  # swapaxes names them axis0, axis1
    d1 = _norm_dim(ctx.arg("dim1", ctx.arg("axis1")), len(x))
    x[d0], x[d1] = x[d1], x[d0]
    ctx.output(x)


def rule_permute(ctx: OpContext) -> None:
    x = ctx.axes("self")
    order = [_norm_dim(d, len(x)) for d in ctx.arg("dims")]
    ctx.output([x[d] for d in order])


def rule_expand(ctx: OpContext) -> None:
    x = ctx.axes("self")
    out = ctx.fresh(ctx.out_dims())
    ctx.broadcast(out, [x])
    if "other" in ctx.bound:  # expand_as
        for a, b in zip(out, ctx.axes("other")):
            ctx.same(a, b)
    if "size" in ctx.bound:
        ctx.rewrite(_rewrite_size_list("size", out, out_dims=ctx.out_dims()))
    ctx.output(out)


def rule_repeat(ctx: OpContext) -> None:
    """Tiling: an axis of size n repeated r times is a product [r, n] whose minor factor is the input axis.

    ``slopes.repeat(batch, 1, 1)`` (BLOOM's ALiBi, ``[heads, 1, L] -> [batch*heads, 1, L]``) folds a
    dynamic batch over the heads: the heads are the minor factor, so cutting them keeps whole tiles
    and the repeat needs no new arguments. New leading axes and the repeat factors are copies, frozen.
    """
    x = ctx.axes("self")
    repeats = list(ctx.arg("repeats"))
    out_dims = ctx.out_dims()
    out = []
    lead = len(out_dims) - len(x)
    for i, d in enumerate(out_dims):
        if i < lead:
            out.append(ctx.fresh([d])[0])
            ctx.freeze(out[-1], "repeated axis")
            continue
        a = x[i - lead]
        if isinstance(repeats[i], int) and repeats[i] == 1:
            out.append(a)
            continue
        n = ctx.dim(a)
        if isinstance(n, Sym) or n == 1:
            out.append(ctx.fresh([d])[0])
            ctx.freeze(out[-1], "repeated axis")
            if n != 1:
                ctx.freeze(a, "repeated axis")
            continue
        out.append(_tiled(ctx, a, n, d))
    ctx.output(out)


def _tiled(ctx: OpContext, axis: int, n: int, d) -> int:
    """The output axis of `axis` (static size n) tiled to size d: a product [copies, n]."""
    alg = ctx.alg
    if isinstance(d, Sym):
        coeff, rest = d.expr.as_coeff_Mul()
        copies = Sym(rest if int(coeff) == n else d.expr / n, d.hint // n)
        folded = alg.new(d.hint, symbolic=d)  # not frozen itself: its static factor may be cut
    else:
        copies, folded = d // n, alg.new(d)
    major = new_atom(alg, copies) if isinstance(copies, Sym) else alg.new(copies)
    ctx.freeze(major, "repeated axis")
    tile, minor = alg.refine(folded, PRODUCT, [alg.size(major), n])
    alg.unify(tile, major)
    ctx.same(minor, axis)
    return folded


def rule_repeat_interleave(ctx: OpContext) -> None:
    """``repeat_interleave(x, r, dim)``: each element repeated r times in place, a product [axis, r].

    A unit of the output is ``r`` consecutive elements per input unit (GPT-J's and Cohere's rotary
    tables, ``[L, d/2] -> [L, d]`` with each frequency twice). Repeats over the flattened input (no
    ``dim``) are refused loudly (the analysis reports the failed rule); repeats given as a tensor
    (``repeat_interleave.self_Tensor``) have no rule: their sizes follow values.
    """
    if ctx.arg("dim") is None:
        raise ValueError("repeat_interleave without dim repeats the flattened input")
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x))
    repeats, n = ctx.arg("repeats"), ctx.dim(x[d])
    out = list(x)
    out_dims = ctx.out_dims()
    if not isinstance(repeats, int) or isinstance(n, Sym):
        out[d] = ctx.fresh([out_dims[d]])[0]
        ctx.freeze(out[d], "repeated axis")
        ctx.freeze(x[d], "repeated axis")
        ctx.output(out)
        return
    if repeats > 1:
        out[d] = ctx.alg.new(n * repeats)
        unit, copies = ctx.alg.refine(out[d], PRODUCT, [n, repeats])
        ctx.same(unit, x[d])
        ctx.freeze(copies, "repeated axis")
    if isinstance(ctx.arg("output_size"), int):
        ctx.rewrite(lambda node, new_size: set_arg(node, "output_size", new_size(out[d])))
    ctx.output(out)


def rule_cat(ctx: OpContext) -> None:
    tensors = [t for t in ctx.arg("tensors") if ctx.is_tensor(t) and ctx.dims_of(t) != [0]]
    out_dims = ctx.out_dims()
    out = ctx.fresh(out_dims)
    d = _norm_dim(ctx.arg("dim", 0), len(out))
    parts = [ctx.axes(t) for t in tensors]
    for p in parts:
        for i, (o, a) in enumerate(zip(out, p)):
            if i != d:
                ctx.same(o, a)
    sizes = [ctx.dim(p[d]) for p in parts]
    if isinstance(out_dims[d], Sym) or any(isinstance(s, Sym) for s in sizes):
        for p in parts:
            ctx.freeze(p[d], "concatenation along a dynamic dimension")
    else:
        for child, p in zip(ctx.alg.refine(out[d], CONCAT, sizes), parts):
            ctx.same(child, p[d])
    ctx.output(out)


def rule_stack(ctx: OpContext) -> None:
    tensors = ctx.arg("tensors")
    out = ctx.fresh(ctx.out_dims())
    d = _norm_dim(ctx.arg("dim", 0), len(out))
    rest = out[:d] + out[d + 1:]
    for t in tensors:
        for o, a in zip(rest, ctx.axes(t)):
            ctx.same(o, a)
    ctx.freeze(out[d], "stacked axis")
    ctx.output(out)


def rule_split(ctx: OpContext) -> None:
    """split/split_with_sizes/chunk/unbind: the axis becomes a concatenation of pieces."""
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim", 0), len(x))
    val = ctx.node.meta["val"]
    sizes = [dims(v)[d] if len(dims(v)) == len(x) else 1 for v in val]
    unbind = len(dims(val[0])) < len(x)
    outs = []
    if unbind or any(isinstance(s, Sym) for s in sizes) or isinstance(ctx.dim(x[d]), Sym):
        ctx.freeze(x[d], "split into a fixed number of pieces" if unbind else "split along a dynamic dimension")
        for k in range(len(val)):
            o = list(x)
            if unbind:
                o.pop(d)
            else:
                o[d] = ctx.fresh([sizes[k]])[0]
                ctx.freeze(o[d], "split along a dynamic dimension")
            outs.append(o)
        ctx.output(outs)
        return
    pieces = ctx.alg.refine(x[d], CONCAT, sizes)
    for piece in pieces:
        o = list(x)
        o[d] = piece
        outs.append(o)

    def rewrite(node: fx.Node, new_size: Callable[[int], int]) -> None:
        new_sizes = [new_size(p) for p in pieces]
        if node.target is torch.ops.aten.split_with_sizes.default:
            set_arg(node, "split_sizes", new_sizes)
        elif new_sizes == [new_size(x[d])] or (len(set(new_sizes)) == 1 and node.target in _EQUAL_PIECES):
            return  # split(size), chunk(n), tensor_split(n) of the smaller axis give these pieces
        else:  # pieces cut unevenly (one frozen, one split): name the sizes
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], new_sizes, d), {}

    ctx.rewrite(rewrite)
    ctx.output(outs)


_EQUAL_PIECES = (torch.ops.aten.chunk.default, torch.ops.aten.tensor_split.sections)


def rule_slice(ctx: OpContext) -> None:
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim", 0), len(x))
    n = ctx.dim(x[d])
    out_dims = ctx.out_dims()
    start, end, step = ctx.arg("start"), ctx.arg("end"), ctx.arg("step", 1)
    if isinstance(n, Sym) or not all(isinstance(v, (int, type(None))) for v in (start, end, step)):
        out = list(x)
        out[d] = ctx.fresh([out_dims[d]])[0]
        if out_dims[d] != n:
            ctx.freeze(x[d], "sliced at a dynamic position")
            ctx.freeze(out[d], "sliced at a dynamic position")
        else:
            out[d] = x[d]
        ctx.output(out)
        return
    start = 0 if start is None else _norm_dim(start, n)
    end = n if end is None else min(_norm_dim(end, n), n)
    start = max(0, min(start, n))
    out = list(x)
    if step != 1 and n % step == 0 and 0 <= start < step and end >= n - step + start + 1:
        _phase(ctx, x, d, n, start, step)
        return
    if step != 1:
        ctx.freeze(x[d], "strided slice")
        out[d] = ctx.fresh([out_dims[d]])[0]
        ctx.freeze(out[d], "strided slice")
        ctx.output(out)
        return
    if (start, end) == (0, n):
        ctx.output(out)
        return
    before, middle, after = ctx.alg.refine(x[d], CONCAT, [start, end - start, n - end])
    out[d] = middle

    def rewrite(node: fx.Node, new_size: Callable[[int], int]) -> None:
        s = new_size(before) if start else 0
        set_arg(node, "start", s)
        set_arg(node, "end", s + new_size(middle))

    ctx.rewrite(rewrite)
    ctx.output(out)


def _phase(ctx: OpContext, x: list[int], d: int, n: int, start: int, step: int) -> None:
    """``x[..., start::step]`` over an axis of n = k * step: the axis is a product [k, step] and the slice
    selects position `start` of the minor factor (GPT-J's ``x[..., ::2]``, ``x[..., 1::2]``: the even and odd
    halves of rotary pairs). The k major units are cut like any axis; the minor factor is a selector."""
    major, minor = ctx.alg.refine(x[d], PRODUCT, [n // step, step])
    ctx.freeze(minor, SELECTED)
    out = list(x)
    out[d] = major

    def rewrite(node: fx.Node, new_size: Callable[[int], int]) -> None:
        set_arg(node, "end", new_size(x[d]))

    ctx.rewrite(rewrite)
    ctx.output(out)


def rule_narrow(ctx: OpContext) -> None:
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x))
    ctx.freeze(x[d], "narrowed")
    out = list(x)
    out[d] = ctx.fresh([ctx.out_dims()[d]])[0]
    ctx.freeze(out[d], "narrowed")
    ctx.output(out)


def rule_select(ctx: OpContext) -> None:
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x))
    ctx.freeze(x[d], SELECTED)
    ctx.output(x[:d] + x[d + 1:])


def rule_pad(ctx: OpContext) -> None:
    x = ctx.axes("self")
    pad = list(ctx.arg("pad"))
    out = list(x)
    for k in range(len(pad) // 2):
        d = len(x) - 1 - k
        lo, hi = pad[2 * k], pad[2 * k + 1]
        if lo == 0 and hi == 0:
            continue
        out[d] = ctx.fresh([ctx.out_dims()[d]])[0]
        if min(lo, hi) < 0 or isinstance(ctx.dim(x[d]), Sym):
            ctx.freeze(x[d], "cropped by padding")
            ctx.freeze(out[d], "cropped by padding")
            continue
        _, middle, _ = ctx.alg.refine(out[d], CONCAT, [lo, ctx.dim(x[d]), hi])
        ctx.same(middle, x[d])
    ctx.output(out)


def rule_pool(ctx: OpContext) -> None:
    """Pooling/upsampling over trailing spatial axes: channels and batch pass through."""
    x = ctx.axes("self") if "self" in ctx.bound else ctx.axes("input")
    val = ctx.node.meta["val"]
    outs = []
    for k in range(len(val) if isinstance(val, (tuple, list)) else 1):
        out_dims = ctx.out_dims(k) if isinstance(val, (tuple, list)) else ctx.out_dims()
        n_spatial = _spatial_rank(op_name(ctx.node))
        lead = len(out_dims) - n_spatial
        out = list(x[:lead]) + ctx.fresh(out_dims[lead:])
        for a in out[lead:]:
            ctx.freeze(a, SPATIAL)
        outs.append(out)
    ctx.output(outs if isinstance(val, (tuple, list)) else outs[0])


def _spatial_rank(name: str) -> int:
    m = re.search(r"([123])d", name)
    return int(m.group(1)) if m else 2
