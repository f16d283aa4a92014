"""Per-op axis rules: which axes of an op's inputs and outputs are one axis.

Each rule is a small function over an :class:`OpContext`. It says which
axes are the *same* (``ctx.same``), which are contracted together (also
``ctx.same``: cutting a contracted axis removes whole terms of the sum, which
is exact), which are normalised or reduced over (``ctx.approximate``), which
are indexed by data (``ctx.freeze``), and how shape constants in the op's
arguments follow when axes shrink (``ctx.rewrite``).

The table at the bottom reads one line per op; the hard case, reshape, is one
algebra (:func:`reshape_axes`). Pointwise ops are handled generically through
their ``torch.Tag.pointwise`` tag with broadcasting. An op with no rule is
never guessed: the analysis freezes all of its axes and reports it.

Users add rules with :func:`register_rule`::

    @istfx.register_rule("mylib.fused_gelu_linear")
    def _(ctx):
        x, w = ctx.axes("x"), ctx.axes("weight")
        ctx.same(x[-1], w[1])                      # contraction
        ctx.output([*x[:-1], w[0]])
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx

from .axes import CONCAT, PRODUCT, AxisAlgebra

Rewriter = Callable[[fx.Node, Callable[[int], int]], None]


@dataclass
class OpContext:
    """What a rule sees of one node: its bound arguments, their axes, its outputs."""

    alg: AxisAlgebra
    node: fx.Node
    bound: dict[str, Any]
    axes_of: Callable[[Any], Any]
    outputs: Any = None
    rewriters: list[Rewriter] = field(default_factory=list)

    # -- reading ---------------------------------------------------------------
    def arg(self, name: str, default: Any = None) -> Any:
        return self.bound.get(name, default)

    def axes(self, name_or_value: Any) -> list[int]:
        value = self.bound[name_or_value] if isinstance(name_or_value, str) else name_or_value
        axes = self.axes_of(value)
        if axes is None or (axes and isinstance(axes[0], list)):
            raise TypeError(f"{name_or_value!r} is not a tensor argument of {self.node.target}")
        return axes

    def is_tensor(self, value: Any) -> bool:
        axes = self.axes_of(value)
        return axes is not None and not (axes and isinstance(axes[0], list))

    def dims_of(self, value: Any) -> list[Any]:
        return [self.dim(a) for a in self.axes(value)]

    def out_dims(self, index: int | None = None) -> list[Any]:
        val = self.node.meta.get("val")
        if index is not None:
            val = val[index]
        return dims(val)

    def dim(self, atom: int) -> Any:
        """Size of an atom: an int, or a :class:`Sym` for dynamic sizes."""
        sym = self.alg.symbolic(atom)
        return sym if sym is not None else self.alg.size(atom)

    # -- writing ---------------------------------------------------------------
    def fresh(self, dims_: Sequence[Any]) -> list[int]:
        return [new_atom(self.alg, d) for d in dims_]

    def output(self, axes: Any) -> None:
        self.outputs = axes

    def same(self, a: int, b: int) -> None:
        da, db = self.dim(a), self.dim(b)
        if da == db:
            self.alg.unify(a, b)
        else:
            reason = f"{op_name(self.node)} pairs axes of sizes {da} and {db}"
            self.alg.freeze(a, reason)
            self.alg.freeze(b, reason)

    def freeze(self, atom: int, why: str) -> None:
        self.alg.freeze(atom, f"{why} ({op_name(self.node)})")

    def approximate(self, atom: int, why: str) -> None:
        self.alg.mark_approximate(atom, f"{why} ({op_name(self.node)})")

    def rewrite(self, fn: Rewriter) -> None:
        self.rewriters.append(fn)

    def broadcast(self, out: Sequence[int], inputs: Sequence[Sequence[int]]) -> None:
        """Right-aligned broadcasting: equal axes are one axis, size-1 axes stretch."""
        for axes in inputs:
            for o, a in zip(reversed(out), reversed(axes)):
                if self.dim(a) == 1 and self.dim(o) != 1:
                    continue
                self.same(o, a)


@dataclass(frozen=True, eq=False)
class Sym:
    """A dynamic size: its sympy expression and the example input's value of it."""

    expr: Any
    hint: int

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sym):
            return bool(sympy.expand(self.expr - other.expr) == 0)
        return False

    def __hash__(self) -> int:
        return hash(str(self.expr))

    def __str__(self) -> str:
        return str(self.expr)


def dims(val: Any) -> list[Any]:
    """Sizes of a (fake) tensor: ints where static, :class:`Sym` where dynamic."""
    out = []
    for d in val.shape:
        if isinstance(d, int):
            out.append(d)
        elif d.node.expr.is_number:
            out.append(int(d.node.expr))
        else:
            out.append(Sym(d.node.expr, int(d.node.hint) if d.node.hint is not None else 2))
    return out


def size_product(sizes: Sequence[Any]) -> Any:
    """Product of static and dynamic sizes (a Sym when any is dynamic)."""
    expr, hint = sympy.Integer(1), 1
    for d in sizes:
        expr, hint = (expr * d.expr, hint * d.hint) if isinstance(d, Sym) else (expr * d, hint * d)
    return int(expr) if expr.is_number else Sym(expr, hint)


def hint(d: Any) -> int:
    return d.hint if isinstance(d, Sym) else int(d)


def new_atom(alg: AxisAlgebra, d: Any) -> int:
    if isinstance(d, Sym):
        return alg.new(d.hint, frozen="dynamic dimension (batch, sequence or nodes)", symbolic=d)
    return alg.new(d)


def op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.__name__}"
    return getattr(target, "__name__", str(target))


def bind(node: fx.Node) -> dict[str, Any]:
    """Arguments of an op node by schema name, defaults filled in."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Replace an argument of an op node by schema name, positional or keyword."""
    names = [a.name for a in node.target._schema.arguments]
    pos = names.index(name)
    if pos < len(node.args):
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _dim_list(value: Any, rank: int) -> list[int]:
    if value is None:
        return list(range(rank))
    if isinstance(value, int):
        value = [value]
    return [_norm_dim(d, rank) for d in value]


# ---------------------------------------------------------------------------
# Reshape algebra
# ---------------------------------------------------------------------------
def reshape_axes(ctx: OpContext, in_axes: list[int], out_dims: list[Any]) -> list[int]:
    """Output atoms of a view of `in_axes` as `out_dims`.

    Sizes are grouped into minimal chunks of equal product (size-1 dims carry
    nothing and are skipped). A chunk of static sizes is one-to-one (same
    axis), one-to-many (split: a product refinement of the input axis),
    many-to-one (flatten: the output axis is refined) or many-to-many (both
    refined to their common factorisation). A chunk with dynamic sizes (GPT-2
    folds batch x sequence into one dim) keeps its axes dynamic and frozen.

    For example [B, 768] viewed as [B, 12, 64] makes the 768 axis 12 heads x 64.
    """
    alg = ctx.alg
    out: list[int | None] = [alg.new(1) if d == 1 else None for d in out_dims]
    ins = [(a, ctx.dim(a)) for a in in_axes if ctx.dim(a) != 1]
    outs = [(i, d) for i, d in enumerate(out_dims) if d != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        chunk_in, chunk_out = [ins[i]], [outs[j]]
        i, j = i + 1, j + 1
        while not _equal_size(size_product([d for _, d in chunk_in]), size_product([d for _, d in chunk_out])):
            grow_in = hint(size_product([d for _, d in chunk_in])) <= hint(size_product([d for _, d in chunk_out]))
            if (grow_in and i < len(ins)) or j >= len(outs):
                if i >= len(ins):
                    break
                chunk_in.append(ins[i])
                i += 1
            else:
                chunk_out.append(outs[j])
                j += 1
        _reshape_chunk(ctx, chunk_in, chunk_out, out)
    leftovers = [a for a, _ in ins[i:]]
    for k, d in enumerate(out_dims):
        if out[k] is None:
            out[k] = new_atom(alg, d)
            leftovers.append(out[k])
    for a in leftovers:
        alg.freeze(a, "reshape sizes could not be matched")
    return out


def _equal_size(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a == b if isinstance(a, Sym) else False


def _reshape_chunk(ctx: OpContext, chunk_in: list, chunk_out: list, out: list) -> None:
    alg = ctx.alg
    if not _equal_size(size_product([d for _, d in chunk_in]), size_product([d for _, d in chunk_out])):
        for a, _ in chunk_in:
            alg.freeze(a, "reshape sizes could not be matched")
        for pos, d in chunk_out:
            out[pos] = new_atom(alg, d)
            alg.freeze(out[pos], "reshape sizes could not be matched")
        return
    if len(chunk_in) == 1 and len(chunk_out) == 1:
        out[chunk_out[0][0]] = chunk_in[0][0]
        return
    if any(isinstance(d, Sym) for _, d in chunk_in + chunk_out):
        for a, _ in chunk_in:
            alg.freeze(a, "reshaped together with a dynamic dimension")
        for pos, d in chunk_out:
            out[pos] = new_atom(alg, d)
            alg.freeze(out[pos], "reshaped together with a dynamic dimension")
        return
    in_atoms = [a for a, _ in chunk_in]
    if len(in_atoms) == 1:
        source = in_atoms[0]
    else:  # many inputs: an axis that is the product of them
        source = alg.new(math.prod(d for _, d in chunk_in))
        for child, a in zip(alg.refine(source, PRODUCT, [d for _, d in chunk_in]), in_atoms):
            alg.unify(child, a)
    for (pos, _), atom in zip(chunk_out, alg.refine(source, PRODUCT, [d for _, d in chunk_out])):
        out[pos] = atom


def _rewrite_size_list(arg_name: str, out_axes: list[int], offset: int = 0) -> Rewriter:
    """Rewriter for a list argument whose static entries are the output's sizes."""

    def rewrite(node: fx.Node, new_size: Callable[[int], int]) -> None:
        sizes = bind(node)[arg_name]
        new = []
        for k, s in enumerate(sizes):
            keep = not isinstance(s, int) or s == -1 or s == 1
            new.append(s if keep else new_size(out_axes[offset + k]))
        set_arg(node, arg_name, new)

    return rewrite


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------
def rule_pointwise(ctx: OpContext) -> None:
    """Elementwise op with broadcasting; scalars and non-tensors are ignored."""
    tensors = [v for v in _flat_values(ctx.bound) if ctx.is_tensor(v)]
    out = ctx.fresh(ctx.out_dims())
    ctx.broadcast(out, [ctx.axes(t) for t in tensors])
    ctx.output(out)


def _flat_values(bound: dict[str, Any]) -> list[Any]:
    out = []
    for v in bound.values():
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def rule_identity(ctx: OpContext) -> None:
    """Output has the input's axes (copies, casts, in-place ops on `self`)."""
    first = next(iter(ctx.bound.values()))
    ctx.output(list(ctx.axes(first)))


def rule_no_output(ctx: OpContext) -> None:
    ctx.output(None)


def rule_linear(ctx: OpContext) -> None:
    x, w = ctx.axes("input"), ctx.axes("weight")
    ctx.same(x[-1], w[1])  # contraction over in_features
    if ctx.arg("bias") is not None:
        ctx.same(w[0], ctx.axes("bias")[0])
    ctx.output([*x[:-1], w[0]])


def rule_addmm(ctx: OpContext) -> None:
    m1, m2 = ctx.axes("mat1"), ctx.axes("mat2")
    ctx.same(m1[1], m2[0])
    out = [m1[0], m2[1]]
    ctx.broadcast(out, [ctx.axes("self")])
    ctx.output(out)


def rule_mm(ctx: OpContext) -> None:
    a, b = ctx.axes("self"), ctx.axes("mat2")
    ctx.same(a[-1], b[-2])
    out = [*a[:-1], b[-1]]
    if len(a) == 3:
        ctx.same(a[0], b[0])
    ctx.output(out)


def rule_matmul(ctx: OpContext) -> None:
    a, b = ctx.axes("self"), ctx.axes("other")
    if len(a) == 1 and len(b) == 1:
        ctx.same(a[0], b[0])
        ctx.output([])
        return
    a_rows, a_k = (a[:-1], a[-1])
    b_k, b_cols = (b[0], []) if len(b) == 1 else (b[-2], [b[-1]])
    ctx.same(a_k, b_k)
    batch_a = a[:-2] if len(a) >= 2 else []
    batch_b = b[:-2] if len(b) >= 2 else []
    out_dims = ctx.out_dims()
    out = ctx.fresh(out_dims)
    n_batch = len(out_dims) - (len(a_rows) - len(batch_a)) - len(b_cols)
    ctx.broadcast(out[:n_batch], [batch_a, batch_b])
    tail = ([a[-2]] if len(a) >= 2 else []) + b_cols
    for o, t in zip(out[n_batch:], tail):
        ctx.same(o, t)
    ctx.output(out)


def rule_baddbmm(ctx: OpContext) -> None:
    a, b = ctx.axes("batch1"), ctx.axes("batch2")
    ctx.same(a[0], b[0])
    ctx.same(a[2], b[1])
    out = [a[0], a[1], b[2]]
    ctx.broadcast(out, [ctx.axes("self")])
    ctx.output(out)


def rule_conv(ctx: OpContext) -> None:
    x, w = ctx.axes("input"), ctx.axes("weight")
    transposed = bool(ctx.arg("transposed", False)) or "transpose" in op_name(ctx.node)
    groups = int(ctx.arg("groups", 1) or 1)
    out_dims = ctx.out_dims()
    unbatched = len(x) == len(w) - 1
    out = ctx.fresh(out_dims)
    c_in, c_out = (w[0], w[1]) if transposed else (w[1], w[0])
    x_ch, out_ch = (x[0], out[0]) if unbatched else (x[1], out[1])
    if not unbatched:
        ctx.same(out[0], x[0])
    for a in w[2:]:
        ctx.freeze(a, "convolution kernel window")
    for a in out[len(out) - (len(w) - 2):]:
        ctx.freeze(a, "spatial size follows the input")
    if groups == 1:
        ctx.same(x_ch, c_in)
        ctx.same(out_ch, c_out)
    elif ctx.dim(x_ch) == groups and ctx.dim(out_ch) == groups and not transposed:
        ctx.same(x_ch, out_ch)  # depthwise: channel c only sees channel c
        ctx.same(out_ch, w[0])
        ctx.freeze(w[1], "depthwise kernel axis")
    else:
        for a in (x_ch, out_ch, w[0], w[1]):
            ctx.freeze(a, f"grouped convolution (groups={groups})")
    if ctx.arg("bias") is not None:
        ctx.same(out_ch, ctx.axes("bias")[0])
    ctx.output(out)


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
    ctx.output(list(x))


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
    ctx.output(list(x))


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


def rule_view(ctx: OpContext) -> None:
    x = ctx.axes("self")
    out = reshape_axes(ctx, x, ctx.out_dims())
    name = "size" if "size" in ctx.bound else "shape"
    if name in ctx.bound:
        ctx.rewrite(_rewrite_size_list(name, out))
    ctx.output(out)


def rule_reshape_like(ctx: OpContext) -> None:
    """flatten/unflatten/view_as/reshape_as: a reshape whose sizes live elsewhere."""
    x = ctx.axes("self") if "self" in ctx.bound else ctx.axes(next(iter(ctx.bound.values())))
    out = reshape_axes(ctx, x, ctx.out_dims())
    if "sizes" in ctx.bound:
        ctx.rewrite(_rewrite_size_list("sizes", out, offset=_norm_dim(ctx.arg("dim"), len(out))))
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
    d0, d1 = (_norm_dim(ctx.arg("dim0", 0), len(x)), _norm_dim(ctx.arg("dim1", 1), len(x)))
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
        ctx.rewrite(_rewrite_size_list("size", out))
    ctx.output(out)


def rule_repeat(ctx: OpContext) -> None:
    x = ctx.axes("self")
    repeats = list(ctx.arg("repeats"))
    out = ctx.fresh(ctx.out_dims())
    lead = len(out) - len(x)
    for i, o in enumerate(out):
        if i >= lead and repeats[i] == 1:
            ctx.same(o, x[i - lead])
        else:
            ctx.freeze(o, "repeated axis")
            if i >= lead:
                ctx.freeze(x[i - lead], "repeated axis")
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
        if node.target is torch.ops.aten.split.Tensor:
            node.target = torch.ops.aten.split_with_sizes.default
            node.args = (node.args[0], new_sizes, *node.args[2:])
        elif node.target is torch.ops.aten.split_with_sizes.default:
            set_arg(node, "split_sizes", new_sizes)
        elif len(set(new_sizes)) != 1 or new_sizes != [new_sizes[0]] * len(pieces):
            raise ValueError(f"cannot shrink {op_name(node)} unevenly")

    ctx.rewrite(rewrite)
    ctx.output(outs)


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
    ctx.freeze(x[d], "a single position is selected")
    ctx.output(x[:d] + x[d + 1:])


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


def rule_gather(ctx: OpContext) -> None:
    x, idx = ctx.axes("self"), ctx.axes("index")
    d = _norm_dim(ctx.arg("dim"), len(x))
    ctx.freeze(x[d], "indexed by data")
    for i, (a, b) in enumerate(zip(x, idx)):
        if i != d:
            ctx.same(a, b) if ctx.dim(a) == ctx.dim(b) else ctx.freeze(a, "partly gathered")
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
        for i, (a, b) in enumerate(zip(x, s)):
            if i != d:
                ctx.same(a, b) if ctx.dim(a) == ctx.dim(b) else ctx.freeze(a, "partly scattered")
    ctx.output(list(x))


def rule_index_add(ctx: OpContext) -> None:
    x = ctx.axes("self")
    d = _norm_dim(ctx.arg("dim"), len(x))
    src = ctx.axes("source")
    ctx.freeze(x[d], "indexed by data")
    ctx.same(src[d], ctx.axes("index")[0])
    for i, (a, b) in enumerate(zip(x, src)):
        if i != d:
            ctx.same(a, b)
    ctx.output(list(x))


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
    x = ctx.axes("self")
    for a in x:
        ctx.freeze(a, "positions chosen by data")
    ctx.output(list(x))


def rule_embedding(ctx: OpContext) -> None:
    w, idx = ctx.axes("weight"), ctx.axes("indices")
    ctx.freeze(w[0], "rows looked up by token id")
    ctx.output([*idx, w[1]])


def rule_sdpa(ctx: OpContext) -> None:
    """scaled_dot_product_attention(q [..., L, E], k [..., S, E], v [..., S, Ev])."""
    q, k, v = ctx.axes("query"), ctx.axes("key"), ctx.axes("value")
    ctx.same(q[-1], k[-1])  # contracted head_dim
    ctx.same(k[-2], v[-2])  # keys and values share the key positions
    ctx.approximate(k[-2], "softmax over")
    if ctx.arg("scale") is None:
        ctx.approximate(q[-1], "default 1/sqrt(head_dim) scale depends on its size")
    if ctx.arg("enable_gqa", False) and len(q) >= 3 and ctx.dim(q[-3]) != ctx.dim(k[-3]):
        groups, _ = ctx.alg.refine(q[-3], PRODUCT, [ctx.dim(k[-3]), ctx.dim(q[-3]) // ctx.dim(k[-3])])
        ctx.same(groups, k[-3])
        ctx.same(k[-3], v[-3])
        batch = q[:-3]
        ctx.broadcast(batch, [k[:-3], v[:-3]])
    else:
        ctx.broadcast(q[:-2], [k[:-2], v[:-2]])
    mask = ctx.arg("attn_mask")
    if mask is not None:
        ctx.broadcast([*q[:-1], k[-2]], [ctx.axes(mask)])
    ctx.output([*q[:-1], v[-1]])


def rule_einsum(ctx: OpContext) -> None:
    equation = ctx.arg("equation").replace(" ", "")
    operands = list(ctx.arg("tensors"))
    lhs, _, rhs = equation.partition("->")
    if "..." in equation or not rhs:
        rule_unknown(ctx, "einsum with ellipsis or implicit output")
        return
    letters: dict[str, int] = {}
    for spec, t in zip(lhs.split(","), operands):
        for ch, a in zip(spec, ctx.axes(t)):
            if ch in letters:
                if ctx.dim(a) == ctx.dim(letters[ch]) or ctx.dim(a) != 1:
                    ctx.same(letters[ch], a)
            else:
                letters[ch] = a
    ctx.output([letters[ch] for ch in rhs])


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
            ctx.freeze(a, "spatial size follows the input")
        outs.append(out)
    ctx.output(outs if isinstance(val, (tuple, list)) else outs[0])


def _spatial_rank(name: str) -> int:
    m = re.search(r"([123])d", name)
    return int(m.group(1)) if m else 2


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


def rule_copy(ctx: OpContext) -> None:
    x = ctx.axes("self")
    ctx.broadcast(x, [ctx.axes("src")])
    ctx.output(list(x))


def rule_where(ctx: OpContext) -> None:
    rule_pointwise(ctx)


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


# ---------------------------------------------------------------------------
# The table: op (namespace.name, or namespace.name.overload) -> rule
# ---------------------------------------------------------------------------
RULES: dict[str, Callable[[OpContext], None]] = {}


def register_rule(op: str | Any, rule: Callable[[OpContext], None] | None = None):
    """Register an axis rule for an op, by name (``"mylib.op"``) or OpOverload/packet.

    Usable as a decorator. A registered rule replaces a built-in one.
    """
    key = _key(op)
    if rule is None:
        def decorator(fn: Callable[[OpContext], None]) -> Callable[[OpContext], None]:
            RULES[key] = fn
            return fn
        return decorator
    RULES[key] = rule
    return rule


def _key(op: Any) -> str:
    if isinstance(op, str):
        return op.replace("::", ".")
    if isinstance(op, torch._ops.OpOverload):
        return f"{op.namespace}.{op._opname}.{op._overloadname}"
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name.replace("::", ".")
    return getattr(op, "__name__", str(op))


def lookup(node: fx.Node) -> Callable[[OpContext], None] | None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        full = f"{target.namespace}.{target._opname}.{target._overloadname}"
        rule = RULES.get(full) or RULES.get(f"{target.namespace}.{target._opname}")
        if rule is None and torch.Tag.pointwise in target.tags:
            return rule_pointwise
        return rule
    return RULES.get(op_name(node))


def _table(rule: Callable[[OpContext], None], *ops: str) -> None:
    for op in ops:
        RULES[op] = rule


_table(rule_linear, "aten.linear")
_table(rule_addmm, "aten.addmm")
_table(rule_mm, "aten.mm", "aten.bmm")
_table(rule_matmul, "aten.matmul")
_table(rule_baddbmm, "aten.baddbmm")
_table(rule_conv, "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten._convolution",
       "aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d")
_table(rule_batch_norm, "aten.batch_norm", "aten.native_batch_norm", "aten._native_batch_norm_legit",
       "aten._native_batch_norm_legit_functional", "aten._native_batch_norm_legit_no_training",
       "aten.instance_norm")
_table(rule_layer_norm, "aten.layer_norm", "aten.native_layer_norm")
_table(rule_rms_norm, "aten.rms_norm")
_table(rule_group_norm, "aten.group_norm", "aten.native_group_norm")
_table(rule_softmax, "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax",
       "aten.special_softmax")
_table(rule_reduce, "aten.sum", "aten.mean", "aten.amax", "aten.amin", "aten.max.dim", "aten.min.dim",
       "aten.var", "aten.std", "aten.var_mean", "aten.std_mean", "aten.logsumexp", "aten.prod",
       "aten.norm", "aten.linalg_vector_norm", "aten.argmax", "aten.argmin", "aten.any", "aten.all",
       "aten.count_nonzero")
_table(rule_scan, "aten.cumsum", "aten.cumprod", "aten.sort", "aten.argsort", "aten.topk", "aten.diff",
       "aten.flip", "aten.roll", "aten.cummax", "aten.cummin")
_table(rule_view, "aten.view", "aten.reshape", "aten._unsafe_view", "aten._reshape_alias")
_table(rule_reshape_like, "aten.flatten", "aten.unflatten", "aten.view_as", "aten.reshape_as")
_table(rule_squeeze, "aten.squeeze")
_table(rule_unsqueeze, "aten.unsqueeze")
_table(rule_transpose, "aten.transpose", "aten.t", "aten.swapaxes", "aten.swapdims", "aten.numpy_T")
_table(rule_permute, "aten.permute")
_table(rule_expand, "aten.expand", "aten.expand_as", "aten.broadcast_to")
_table(rule_repeat, "aten.repeat")
_table(rule_cat, "aten.cat", "aten.concat", "aten.concatenate")
_table(rule_stack, "aten.stack")
_table(rule_split, "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.tensor_split")
_table(rule_slice, "aten.slice")
_table(rule_narrow, "aten.narrow")
_table(rule_select, "aten.select")
_table(rule_index_select, "aten.index_select")
_table(rule_index, "aten.index", "aten._unsafe_index")
_table(rule_gather, "aten.gather")
_table(rule_scatter, "aten.scatter", "aten.scatter_", "aten.scatter_add", "aten.scatter_add_",
       "aten.scatter_reduce", "aten.scatter_reduce_")
_table(rule_index_add, "aten.index_add", "aten.index_add_")
_table(rule_index_put, "aten.index_put", "aten.index_put_", "aten._index_put_impl_")
_table(rule_masked_scatter_like, "aten.masked_scatter", "aten.masked_select")
_table(rule_embedding, "aten.embedding")
_table(rule_sdpa, "aten.scaled_dot_product_attention")
_table(rule_einsum, "aten.einsum")
_table(rule_pool, "aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d", "aten.avg_pool1d",
       "aten.avg_pool2d", "aten.avg_pool3d", "aten.adaptive_avg_pool1d", "aten.adaptive_avg_pool2d",
       "aten.adaptive_avg_pool3d", "aten.adaptive_max_pool1d", "aten.adaptive_max_pool2d",
       "aten.max_pool2d_with_indices", "aten.upsample_nearest2d", "aten.upsample_bilinear2d",
       "aten._adaptive_avg_pool2d")
_table(rule_pad, "aten.constant_pad_nd", "aten.pad")
_table(rule_creation, "aten.zeros", "aten.ones", "aten.full", "aten.empty", "aten.new_zeros",
       "aten.new_ones", "aten.new_full", "aten.new_empty", "aten.zeros_like", "aten.ones_like",
       "aten.full_like", "aten.empty_like", "aten.rand", "aten.randn", "aten.rand_like", "aten.randn_like",
       "aten.scalar_tensor")
_table(rule_positions, "aten.arange", "aten.tril", "aten.triu", "aten.eye", "aten.tril_", "aten.triu_")
_table(rule_copy, "aten.copy_", "aten.copy")
_table(rule_pointwise, "aten.dropout", "aten.where", "aten.clamp", "aten.clamp_min", "aten.clamp_max",
       "aten.masked_fill", "aten.masked_fill_", "aten.native_dropout", "aten.feature_dropout",
       "aten.alpha_dropout", "aten.lerp", "aten.addcmul", "aten.addcdiv", "aten.hardtanh",
       "aten.hardtanh_", "aten.gelu", "aten.silu", "aten.mish", "aten.softplus", "aten.elu",
       "aten.leaky_relu", "aten.hardswish", "aten.hardsigmoid", "aten.relu6", "aten.celu", "aten.selu",
       "aten.glu_not_supported", "aten.__and__", "aten.__or__", "aten.__xor__", "aten.logical_not",
       "aten.type_as", "aten.nan_to_num", "aten.pow", "aten.pow_", "aten.fill_", "aten.fill",
       "aten.zero_", "aten.bernoulli", "aten.bernoulli_", "aten.threshold", "aten.rsub")
_table(rule_identity, "aten.to", "aten._to_copy", "aten.contiguous", "aten.clone", "aten.detach",
       "aten.detach_", "aten.alias", "aten.lift_fresh_copy", "aten.lift_fresh", "aten.requires_grad_",
       "aten.clone_", "aten.relu_", "aten.sigmoid_", "aten.tanh_", "aten.mul_", "aten.add_", "aten.div_",
       "aten.sub_", "aten.neg_", "aten.exp_", "aten.sqrt_", "aten.clamp_", "aten.clamp_min_",
       "aten.clamp_max_", "aten.dropout_", "aten.float", "aten.double", "aten.half", "aten.bfloat16",
       "aten.type", "aten.resolve_conj", "aten.resolve_neg", "aten.positive")
_table(rule_no_output, "aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range",
       "aten.sym_constrain_range_for_size", "aten._assert_async", "aten.sym_size", "aten.sym_numel",
       "aten.sym_stride", "aten.sym_storage_offset", "aten._local_scalar_dense", "aten.item",
       "aten._functional_assert_async", "aten._print")
_table(rule_getitem, "getitem")
_table(rule_prelu, "aten.prelu", "aten._prelu_kernel")
# Python arithmetic on sizes (SymInt) carries no tensor axes.
for _fn in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
            operator.neg, operator.ge, operator.gt, operator.le, operator.lt, operator.eq, operator.ne,
            operator.pow, operator.and_, operator.or_):
    RULES[_fn.__name__] = rule_no_output
for _name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "_sym_sqrt"):
    RULES[_name] = rule_no_output
