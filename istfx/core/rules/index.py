"""Indexing ops: axes indexed by data are frozen; the rest pass through (graph networks)."""
from __future__ import annotations



from .context import OpContext, _norm_dim


def rule_index_select(ctx: OpContext) -> None:
    x, idx = ctx.axes("self"), ctx.axes("index")
    d = _norm_dim(ctx.arg("dim"), len(x))
    ctx.freeze(x[d], "indexed by data")
    out = list(x)
    out[d] = idx[0] if idx else ctx.fresh([ctx.out_dims()[d]])[0]
    ctx.output(out)


def rule_index(ctx: OpContext) -> None:
    """Advanced indexing x[i0, i1, ...]: indexed axes frozen, the rest pass through."""
    x = ctx.axes("self")
    indices = list(ctx.arg("indices"))
    used = [i for i, t in enumerate(indices) if t is not None]
    for i in used:
        ctx.freeze(x[i], "indexed by data")
    out_dims = ctx.out_dims()
    out = ctx.fresh(out_dims)
    contiguous = used == list(range(used[0], used[-1] + 1)) if used else True
    if contiguous and used:
        head = x[: used[0]]
        tail = x[used[-1] + 1:]
        for o, a in zip(out[: len(head)], head):
            ctx.same(o, a)
        for o, a in zip(out[len(out) - len(tail):], tail):
            ctx.same(o, a)
        mid = out[len(head): len(out) - len(tail)]
        ctx.broadcast(mid, [ctx.axes(indices[i]) for i in used])
    else:
        for a in [*x, *out]:
            ctx.freeze(a, "non-contiguous advanced indexing")
    ctx.output(out)


def _pair_except(ctx: OpContext, x: list[int], other: list[int], dim: int, partial: str) -> None:
    """Axes other than `dim` are one axis where sizes agree; a partial overlap freezes."""
    for i, (a, b) in enumerate(zip(x, other)):
        if i != dim:
            if ctx.dim(a) == ctx.dim(b):
                ctx.same(a, b)
            else:
                ctx.freeze(a, partial)


def rule_gather(ctx: OpContext) -> None:
    x, idx = ctx.axes("self"), ctx.axes("index")
    d = _norm_dim(ctx.arg("dim"), len(x))
    ctx.freeze(x[d], "indexed by data")
    _pair_except(ctx, x, idx, d, "partly gathered")
    ctx.output(list(idx))


def rule_scatter(ctx: OpContext) -> None:
    """scatter/scatter_add/scatter_reduce (and in-place): src lands in self along `dim`."""
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x))
    ctx.freeze(x[d], "indexed by data")
    src = ctx.arg("src")
    idx = ctx.axes("index")
    if src is not None and ctx.is_tensor(src):
        s = ctx.axes(src)
        for a, b in zip(idx, s):
            ctx.same(a, b)
        _pair_except(ctx, x, s, d, "partly scattered")
    ctx.output(list(x))


def rule_index_add(ctx: OpContext) -> None:
    """index_add/index_copy/index_reduce: rows of `source` land in `self` at `index` along `dim`.

    Every other axis is reduced (or copied) column by column, so it passes through
    whatever ``reduce`` is (GNN message aggregation: the feature/head axes pass
    through, the node axis is frozen).
    """
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x))
    src = ctx.axes("source")
    ctx.freeze(x[d], "indexed by data")
    ctx.same(src[d], ctx.axes("index")[0])
    for i, (a, b) in enumerate(zip(x, src)):
        if i != d:
            ctx.same(a, b)
    ctx.output(list(x))


def rule_index_fill(ctx: OpContext) -> None:
    """index_fill: positions chosen by `index` along `dim` are overwritten; other axes pass through."""
    x = ctx.axes("self")
    ctx.freeze(x[_norm_dim(ctx.arg("dim"), len(x))], "indexed by data")
    ctx.output(list(x))


def rule_segment_reduce(ctx: OpContext) -> None:
    """segment_reduce: runs of `data` along `axis` (lengths/offsets given by data) reduced to one row each.

    The segmented axis is frozen on both sides; every other axis is reduced
    column by column and passes through (PyG's ``segment`` on CSR batches).
    """
    x = ctx.axes("data")
    d = _norm_dim(ctx.arg("axis", 0), len(x))
    ctx.freeze(x[d], "segmented by data")
    out = list(x)
    out[d] = ctx.fresh([ctx.out_dims()[d]])[0]
    ctx.freeze(out[d], "one row per segment")
    for name in ("lengths", "offsets"):
        bounds = ctx.arg(name)
        if bounds is not None and ctx.is_tensor(bounds):  # batched segments: leading axes pair with data's
            for a, b in zip(x[:d], ctx.axes(bounds)[:d]):
                ctx.same(a, b)
    ctx.output(out)


def rule_index_put(ctx: OpContext) -> None:
    x = ctx.axes("self")
    indices = list(ctx.arg("indices"))
    for i, t in enumerate(indices):
        if t is not None:
            ctx.freeze(x[i], "indexed by data")
    values = ctx.axes("values")
    rest = [a for i, a in enumerate(x) if i >= len(indices) or indices[i] is None]
    ctx.broadcast(rest, [values[len(values) - min(len(values), len(rest)):]])
    ctx.output(list(x))


def rule_masked_scatter_like(ctx: OpContext) -> None:
    """masked_scatter/masked_select: which positions are written or read is data."""
    x = ctx.axes("self")
    for a in x:
        ctx.freeze(a, "positions chosen by data")
    if len(ctx.out_dims()) == len(x):
        ctx.output(list(x))
    else:  # masked_select: the selected elements, flattened
        out = ctx.fresh(ctx.out_dims())
        for a in out:
            ctx.freeze(a, "positions chosen by data")
        ctx.output(out)


def rule_embedding(ctx: OpContext) -> None:
    w, idx = ctx.axes("weight"), ctx.axes("indices")
    ctx.freeze(w[0], "rows looked up by token id")
    ctx.output([*idx, w[1]])
