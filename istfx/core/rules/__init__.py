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

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from .context import OpContext, Rewriter, Sym, bind, dims, new_atom, op_name, set_arg
from .contract import (rule_addmm, rule_baddbmm, rule_conv, rule_einsum, rule_linear, rule_matmul, rule_mm, rule_sdpa,
                       rule_sum)
from .elementwise import (rule_arange, rule_copy, rule_creation, rule_getitem, rule_identity, rule_no_output,
                          rule_pointwise, rule_positions, rule_prelu, rule_unknown)
from .experts import rule_grouped_mm, rule_histc
from .index import (rule_embedding, rule_gather, rule_index, rule_index_add, rule_index_fill, rule_index_put,
                    rule_index_select, rule_masked_scatter_like, rule_scatter, rule_segment_reduce)
from .norm import rule_batch_norm, rule_group_norm, rule_layer_norm, rule_reduce, rule_rms_norm, rule_scan, rule_softmax
from .reshape import reshape_axes
from .shape import (rule_cat, rule_expand, rule_narrow, rule_pad, rule_permute, rule_pool, rule_repeat,
                    rule_repeat_interleave,
                    rule_reshape_like, rule_select, rule_slice, rule_split, rule_squeeze, rule_stack, rule_transpose,
                    rule_unsqueeze, rule_view)

__all__ = ["OpContext", "Rewriter", "Sym", "RULES", "register_rule", "lookup", "bind", "dims", "new_atom",
           "op_name", "set_arg", "reshape_axes", "rule_unknown"]

# op (namespace.name, or namespace.name.overload) -> rule
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
    """The rule for a node's op: exact overload, then op name, then the pointwise tag, then, for an
    in-place op (``hardswish_``, ``relu_``, ``add_``: tag ``inplace``), its out-of-place op's rule."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _op_rule(target)
    return RULES.get(op_name(node))


def _op_rule(target: torch._ops.OpOverload) -> Callable[[OpContext], None] | None:
    full = f"{target.namespace}.{target._opname}.{target._overloadname}"
    rule = RULES.get(full) or RULES.get(f"{target.namespace}.{target._opname}")
    if rule is None and torch.Tag.pointwise in target.tags:
        return rule_pointwise
    if rule is None and torch.Tag.inplace in target.tags:
        functional = _out_of_place(target)
        if functional is not None:
            return _op_rule(functional)
    return rule


def _out_of_place(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.hardswish_.default`` -> ``aten.hardswish.default``: the op an in-place op writes into `self`.

    Its rule holds for the in-place op too: the output is `self` (same shape),
    which the out-of-place rule pairs with `self`'s axes.
    """
    if not target._opname.endswith("_"):
        return None
    packet = getattr(getattr(torch.ops, target.namespace), target._opname[:-1], None)
    if packet is None:
        return None
    return getattr(packet, target._overloadname, None)


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
_table(rule_sum, "aten.sum")
_table(rule_reduce, "aten.mean", "aten.amax", "aten.amin", "aten.max.dim", "aten.min.dim",
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
_table(rule_repeat_interleave, "aten.repeat_interleave.self_int")
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
_table(rule_index_add, "aten.index_add", "aten.index_add_", "aten.index_copy", "aten.index_copy_",
       "aten.index_reduce", "aten.index_reduce_")
_table(rule_index_fill, "aten.index_fill", "aten.index_fill_")
_table(rule_segment_reduce, "aten.segment_reduce")
_table(rule_index_put, "aten.index_put", "aten.index_put_", "aten._index_put_impl_")
_table(rule_masked_scatter_like, "aten.masked_scatter", "aten.masked_select")
_table(rule_embedding, "aten.embedding")
_table(rule_sdpa, "aten.scaled_dot_product_attention")
_table(rule_einsum, "aten.einsum")
_table(rule_grouped_mm, "transformers.grouped_mm_fallback")
_table(rule_histc, "aten.histc")
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
_table(rule_arange, "aten.arange")
_table(rule_positions, "aten.tril", "aten.triu", "aten.eye", "aten.tril_", "aten.triu_")
_table(rule_copy, "aten.copy_", "aten.copy")
_table(rule_pointwise, "aten.dropout", "aten.where", "aten.clamp", "aten.clamp_min", "aten.clamp_max",
       "aten.masked_fill", "aten.native_dropout", "aten.feature_dropout",
       "aten.alpha_dropout", "aten.lerp", "aten.addcmul", "aten.addcdiv", "aten.hardtanh",
       "aten.gelu", "aten.silu", "aten.mish", "aten.softplus", "aten.elu",
       "aten.leaky_relu", "aten.hardswish", "aten.hardsigmoid", "aten.relu6", "aten.celu", "aten.selu",
       "aten.__and__", "aten.__or__", "aten.__xor__", "aten.logical_not",
       "aten.type_as", "aten.nan_to_num", "aten.pow", "aten.fill_", "aten.fill",
       "aten.zero_", "aten.bernoulli", "aten.bernoulli_", "aten.threshold", "aten.rsub",
       "aten.floor_divide", "aten.remainder", "aten.fmod")
# In-place ops (relu_, add_, hardswish_...) need no line: `lookup` gives them their out-of-place op's rule.
_table(rule_identity, "aten.to", "aten._to_copy", "aten.contiguous", "aten.clone", "aten.detach",
       "aten.detach_", "aten.alias", "aten.lift_fresh_copy", "aten.lift_fresh", "aten.requires_grad_",
       "aten.dropout_", "aten.resolve_conj", "aten.resolve_neg", "aten.positive")
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
for _name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "_sym_sqrt"):
    RULES[_name] = rule_no_output
