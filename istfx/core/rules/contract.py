"""Contractions: linear, matmul, convolution, attention, einsum, sums of products."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..axes import KERNEL_WINDOW, PRODUCT, SPATIAL
from .context import OpContext, Rewriter, Sym, _dim_list, op_name, set_arg
from .norm import rule_reduce


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
    """Convolution, plain, grouped, depthwise or transposed.

    With ``groups=G`` the input channels are ``G x C_in/G`` and the output
    channels ``G x C_out/G`` (a product refinement, like heads x head_dim):
    group g's outputs contract only group g's inputs. The major factors are one
    axis, the groups, whose unit is a whole group; the per-group input factor is
    contracted with the kernel's second axis (``weight[1]``, or ``weight[0]``'s
    minor factor when transposed). A depthwise conv (``C_in = G``) is the case
    of one input channel per group: its channels are the groups. The ``groups``
    argument follows the number of groups a subnet keeps.
    """
    x, w = ctx.axes("input"), ctx.axes("weight")
    transposed = bool(ctx.arg("transposed", False)) or "transpose" in op_name(ctx.node)
    groups = int(ctx.arg("groups", 1) or 1)
    out_dims = ctx.out_dims()
    unbatched = len(x) == len(w) - 1
    out = ctx.fresh(out_dims)
    x_ch, out_ch = (x[0], out[0]) if unbatched else (x[1], out[1])
    if not unbatched:
        ctx.same(out[0], x[0])
    for a in w[2:]:
        ctx.freeze(a, KERNEL_WINDOW)
    for a in out[len(out) - (len(w) - 2):]:
        ctx.freeze(a, SPATIAL)
    if transposed:  # weight [C_in, C_out/G, k...]
        ctx.same(x_ch, w[0])
        in_full, out_per_group_axis = w[0], w[1]
    else:  # weight [C_out, C_in/G, k...]
        ctx.same(out_ch, w[0])
        in_full, out_per_group_axis = x_ch, None
    if groups == 1:
        if transposed:
            ctx.same(out_ch, w[1])
        else:
            ctx.same(x_ch, w[1])
    else:
        c_in, c_out = ctx.dim(x_ch), ctx.dim(out_ch)
        if isinstance(c_in, Sym) or isinstance(c_out, Sym) or c_in % groups or c_out % groups:
            for a in (x_ch, out_ch, *w[:2]):
                ctx.freeze(a, f"grouped convolution (groups={groups}) over channels of unknown size")
        else:
            in_groups, in_per_group = ctx.alg.refine(in_full, PRODUCT, [groups, c_in // groups])
            out_groups, out_per_group = ctx.alg.refine(out_ch, PRODUCT, [groups, c_out // groups])
            ctx.same(in_groups, out_groups)
            if transposed:
                ctx.same(out_per_group, out_per_group_axis)
            else:
                ctx.same(in_per_group, w[1])
            ctx.rewrite(_rewrite_groups(in_groups))
    if ctx.arg("bias") is not None:
        ctx.same(out_ch, ctx.axes("bias")[0])
    ctx.output(out)


def _rewrite_groups(groups_atom: int) -> Rewriter:
    """``groups`` of a grouped convolution follows the number of groups a subnet keeps."""

    def rewrite(node: fx.Node, new_size: Callable[[int], int]) -> None:
        set_arg(node, "groups", new_size(groups_atom))

    return rewrite


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
        # Raised so the analysis freezes the op's axes and reports it like an op without a rule.
        raise ValueError(f"einsum {equation!r}: ellipsis or implicit output has no axis rule")
    letters: dict[str, int] = {}
    for spec, t in zip(lhs.split(","), operands):
        for ch, a in zip(spec, ctx.axes(t)):
            if ch in letters:
                if ctx.dim(a) == ctx.dim(letters[ch]) or ctx.dim(a) != 1:
                    ctx.same(letters[ch], a)
            else:
                letters[ch] = a
    ctx.output([letters[ch] for ch in rhs])


# Value-preserving ops a parameter may pass through and still be a factor whose
# masked units are zero (casts, copies, views).
_ZERO_PRESERVING = {
    "aten._to_copy", "aten.to", "aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.view",
    "aten.reshape", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.permute",
    "aten.transpose", "aten.t",
}


def _parameter_factor(node: object) -> fx.Node | None:
    """The parameter/buffer read behind `node` through value-preserving ops, else None."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node
        if node.op != "call_function" or op_name(node) not in _ZERO_PRESERVING or not node.args:
            return None
        node = node.args[0]
    return None


def rule_sum(ctx: OpContext) -> None:
    """sum: a contraction over the axes that a parameter factor of its summand carries.

    ``(x * att).sum(-1)`` with ``att`` a parameter is ``einsum('nhc,hc->nh')``
    (GAT's attention logits): masking units of ``c`` zeroes their entries of
    ``att``, so their terms vanish from the sum and cutting ``c`` is exact,
    like the contraction of a linear layer. Any other reduced axis, and any
    sum of something that is not such a product, is approximate as for the
    other reductions.
    """
    x = ctx.axes("self")
    summand = ctx.arg("self")
    contracted: set[int] = set()
    if isinstance(summand, fx.Node) and summand.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor):
        for operand in summand.args[:2]:
            param = _parameter_factor(operand)
            if param is not None and ctx.is_tensor(param):
                contracted |= {ctx.alg.find(a) for a in ctx.axes(param) if ctx.dim(a) != 1}
    reduced = set(_dim_list(ctx.arg("dim"), len(x)))
    if not contracted or not any(ctx.alg.find(x[i]) in contracted for i in reduced):
        rule_reduce(ctx)
        return
    keep = bool(ctx.arg("keepdim", False))
    out = []
    for i, a in enumerate(x):
        if i not in reduced:
            out.append(a)
            continue
        if ctx.alg.find(a) not in contracted:
            ctx.approximate(a, "reduced over")
        if keep:
            out.append(ctx.alg.new(1))
    ctx.output(out)
