"""The op rule table (istfx/core/rules/__init__.py), op by op, and ``register_rule``.

Every op the table names has a case here: a one-line call that produces the
op from small operand tensors, and the axis couplings its rule promises. The
cases of one table line are captured together in one tiny module (its
operands are buffers, so every axis is a state axis with a name), the
analysis runs once per line, and each case checks its own node. A test fails
when the table names an op that has no case, so a new rule comes with one.

The expectations are written over axis names: ``a1`` is axis 1 of the first
operand (``b``, ``c``... the next ones), ``o1`` axis 1 of the op's output and
``o1.0`` axis 0 of output 1 when the op returns a tuple. Clauses, space
separated:

====================  ===============================================================
``a1=b1``             one axis (cut the same way)
``a1!=o1``            two different axes
``a1!``               frozen by the op (never cut)
``a1?``               approximate (normalised or reduced over)
``a1+``               free: neither frozen by the op nor approximate
``a1=o1*o2``          a1 is the product o1 (major) x o2 (minor): a view 12 -> 3x4
``o1=a1|b1``          o1 is the concatenation a1 then b1 (offsets follow the sizes);
                      ``_`` is a segment no operand axis is (a slice's cut-off ends)
``o=-``               the op has no tensor output
====================  ===============================================================

Every case also checks that the op raised no diagnostic and that its output
has one axis per dimension. Adding a case for a new table line is one
``C(...)`` line in ``CASES``.
"""
from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
from torch import nn
import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

import istfx
from istfx.core.analysis import AnalysisResult, AxisAnalysis
from istfx.core.axes import CONCAT, PRODUCT
from istfx.core.rules import RULES, op_name

aten = torch.ops.aten
F32 = torch.float32

# Reasons every model input/output carries; the cases ask what the op itself did.
_BOUNDARY = ("model input", "model output")


@dataclass(frozen=True)
class Case:
    """One op of the table: how to produce it and what its rule promises."""

    op: str                          # the table key, e.g. "aten.linear" or "aten.max.dim"
    call: Callable[..., Any]         # operands -> a value whose graph contains the op
    operands: tuple                  # shapes (float tensors) or tensors, in order a, b, c...
    expect: str                      # clauses over axis names (module docstring)
    note: str = ""                   # tells apart several cases of one op (in the test id)
    trace: str = "export"            # "fx": ops export folds away on static shapes (see _capture)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.note}]" if self.note else self.op


def C(op: str, call: Callable[..., Any], operands: list, expect: str, note: str = "", trace: str = "export") -> Case:
    return Case(op, call, tuple(operands), expect, note, trace)


def L(*values: int) -> torch.Tensor:
    """An integer (index) operand."""
    return torch.tensor(values, dtype=torch.long)


def Lk(shape: tuple, high: int) -> torch.Tensor:
    """An integer operand of `shape` with values below `high`."""
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(0))


def Bm(shape: tuple) -> torch.Tensor:
    """A boolean (mask) operand."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5


def cl(t: torch.Tensor) -> torch.Tensor:
    """A copy to run an in-place op on (operands are the module's buffers)."""
    return aten.clone(t)


# Sizes are all different so that a rule pairing the wrong axes cannot pass by accident.
# In-place ops have no table line: `lookup` gives them their out-of-place op's rule (tag ``inplace``).
IN_PLACE = "in-place: the out-of-place rule"

CASES: list[Case] = [
    # -- contractions --------------------------------------------------------------------------------
    C("aten.linear", lambda a, b, c: aten.linear(a, b, c), [(2, 3), (4, 3), (4,)], "a1=b1 o1=b0 c0=b0 o0=a0 b0+ a1+"),
    C("aten.addmm", lambda a, b, c: aten.addmm(a, b, c), [(4,), (2, 3), (3, 4)], "b1=c0 o0=b0 o1=c1 a0=c1"),
    C("aten.mm", lambda a, b: aten.mm(a, b), [(2, 3), (3, 4)], "a1=b0 o0=a0 o1=b1 a1+"),
    C("aten.bmm", lambda a, b: aten.bmm(a, b), [(5, 2, 3), (5, 3, 4)], "a2=b1 a0=b0 o0=a0 o1=a1 o2=b2"),
    C("aten.matmul", lambda a, b: aten.matmul(a, b), [(5, 2, 3), (3, 4)], "a2=b0 o0=a0 o1=a1 o2=b1"),
    C("aten.baddbmm", lambda a, b, c: aten.baddbmm(a, b, c), [(4,), (5, 2, 3), (5, 3, 4)],
      "b0=c0 b2=c1 o0=b0 o1=b1 o2=c2 a0=c2"),
    C("aten.conv1d", lambda a, b, c: aten.conv1d(a, b, c), [(2, 3, 7), (4, 3, 2), (4,)],
      "a1=b1 o1=b0 c0=b0 o0=a0 b2! o2! b0+ a1+"),
    C("aten.conv2d", lambda a, b, c: aten.conv2d(a, b, c), [(2, 3, 6, 7), (4, 3, 2, 2), (4,)],
      "a1=b1 o1=b0 c0=b0 o0=a0 b2! b3! o2! o3!"),
    C("aten.conv3d", lambda a, b, c: aten.conv3d(a, b, c), [(2, 3, 4, 5, 6), (4, 3, 2, 2, 2), (4,)],
      "a1=b1 o1=b0 c0=b0 o0=a0 b4! o4!"),
    C("aten.convolution",
      lambda a, b, c: aten.convolution(a, b, c, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
      [(2, 3, 6, 7), (4, 3, 2, 2), (4,)], "a1=b1 o1=b0 c0=b0 o0=a0 b2! o3!"),
    C("aten._convolution",
      lambda a, b, c: aten._convolution(a, b, c, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, False, False, True, True),
      [(2, 3, 6, 7), (4, 3, 2, 2), (4,)], "a1=b1 o1=b0 c0=b0 o0=a0 b2! o3!"),
    C("aten.conv_transpose1d", lambda a, b, c: aten.conv_transpose1d(a, b, c), [(2, 3, 7), (3, 4, 2), (4,)],
      "a1=b0 o1=b1 c0=b1 o0=a0 b2! o2!"),
    C("aten.conv_transpose2d", lambda a, b, c: aten.conv_transpose2d(a, b, c), [(2, 3, 6, 7), (3, 4, 2, 2), (4,)],
      "a1=b0 o1=b1 c0=b1 o0=a0 b3! o3!"),
    C("aten.conv_transpose3d", lambda a, b, c: aten.conv_transpose3d(a, b, c),
      [(2, 3, 4, 5, 6), (3, 4, 2, 2, 2), (4,)], "a1=b0 o1=b1 c0=b1 o0=a0 b4! o4!"),
    C("aten.scaled_dot_product_attention", lambda a, b, c: aten.scaled_dot_product_attention(a, b, c),
      [(2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 3)], "a3=b3 b2=c2 b2? a3? a1=b1 c1=a1 o1=a1 o2=a2 o3=c3 c3+"),
    C("aten.einsum", lambda a, b: aten.einsum("ij,jk->ik", [a, b]), [(2, 3), (3, 4)], "a1=b0 o0=a0 o1=b1 a1+"),
    C("aten.sum", lambda a: aten.sum(a, [1]), [(2, 3)], "a1? o0=a0"),
    # sum of a product with a parameter-like factor (GAT's attention logits): a contraction, exact
    C("aten.sum", lambda a, b: aten.sum(aten.mul(a, b), [1]), [(2, 3), (3,)], "a1=b0 b0+ o0=a0",
      note="contraction"),
    # -- normalisations, reductions, scans -----------------------------------------------------------
    C("aten.batch_norm", lambda a, b, c, d, e: aten.batch_norm(a, b, c, d, e, False, 0.1, 1e-5, False),
      [(2, 3, 4), (3,), (3,), (3,), (3,)], "a1=b0 a1=c0 a1=d0 a1=e0 a1+ a0? a2? o1=a1"),
    C("aten.native_batch_norm", lambda a, b, c, d, e: aten.native_batch_norm(a, b, c, d, e, True, 0.1, 1e-5),
      [(2, 3, 4), (3,), (3,), (3,), (3,)], "a1=b0 a1=e0 a2? o0.1=a1 o1.0=a1 o2.0=a1"),
    C("aten._native_batch_norm_legit", lambda a, b, c, d, e: aten._native_batch_norm_legit(a, b, c, d, e, True, 0.1, 1e-5),
      [(2, 3, 4), (3,), (3,), (3,), (3,)], "a1=b0 a1=d0 a2? o0.1=a1 o1.0=a1"),
    C("aten._native_batch_norm_legit_functional",
      lambda a, b, c, d, e: aten._native_batch_norm_legit_functional(a, b, c, d, e, True, 0.1, 1e-5),
      [(2, 3, 4), (3,), (3,), (3,), (3,)], "a1=b0 a1=d0 a2? o0.1=a1 o3.0=a1 o4.0=a1"),
    C("aten._native_batch_norm_legit_no_training",
      lambda a, b, c, d, e: aten._native_batch_norm_legit_no_training(a, b, c, d, e, 0.1, 1e-5),
      [(2, 3, 4), (3,), (3,), (3,), (3,)], "a1=b0 a1=e0 a0? o0.1=a1"),
    C("aten.instance_norm",
      lambda a, b, c, d, e: aten.instance_norm(a, b, c, d, e, False, 0.1, 1e-5, False),
      [(2, 3, 4), (3,), (3,), (3,), (3,)], "a1=b0 a1=c0 a2? o1=a1"),
    C("aten.layer_norm", lambda a, b, c: aten.layer_norm(a, [4], b, c), [(2, 3, 4), (4,), (4,)],
      "a2=b0 a2=c0 a2? a1+ o2=a2 o1=a1"),
    C("aten.native_layer_norm", lambda a, b, c: aten.native_layer_norm(a, [4], b, c, 1e-5), [(2, 3, 4), (4,), (4,)],
      "a2=b0 a2=c0 a2? a1+ o0.2=a2 o0.1=a1"),
    C("aten.rms_norm", lambda a, b: aten.rms_norm(a, [4], b), [(2, 3, 4), (4,)], "a2=b0 a2? a1+ o2=a2"),
    C("aten.group_norm", lambda a, b, c: aten.group_norm(a, 2, b, c), [(3, 4, 5), (4,), (4,)],
      "a1=b0 a1=c0 a1! a2? a0+ o1=a1"),
    C("aten.native_group_norm", lambda a, b, c: aten.native_group_norm(a, b, c, 3, 4, 5, 2, 1e-5),
      [(3, 4, 5), (4,), (4,)], "a1=b0 a1! a2? o0.1=a1"),
    C("aten.softmax", lambda a: aten.softmax(a, 1), [(2, 3)], "a1? a0+ o0=a0 o1=a1"),
    C("aten._softmax", lambda a: aten._softmax(a, 1, False), [(2, 3)], "a1? a0+ o1=a1"),
    C("aten.log_softmax", lambda a: aten.log_softmax(a, 0), [(2, 3)], "a0? a1+ o0=a0"),
    C("aten._log_softmax", lambda a: aten._log_softmax(a, 1, False), [(2, 3)], "a1? a0+ o1=a1"),
    C("aten.special_softmax", lambda a: aten.special_softmax(a, 1), [(2, 3)], "a1? a0+ o1=a1"),
    C("aten.mean", lambda a: aten.mean(a, [1]), [(2, 3)], "a1? a0+ o0=a0"),
    C("aten.amax", lambda a: aten.amax(a, [0], True), [(2, 3)], "a0? a1+ o1=a1 o0!=a0"),
    C("aten.amin", lambda a: aten.amin(a, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.max.dim", lambda a: aten.max.dim(a, 1), [(2, 3)], "a1? o0.0=a0 o1.0=a0"),
    C("aten.min.dim", lambda a: aten.min.dim(a, 0), [(2, 3)], "a0? o0.0=a1 o1.0=a1"),
    C("aten.var", lambda a: aten.var(a, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.std", lambda a: aten.std(a, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.var_mean", lambda a: aten.var_mean(a, [1]), [(2, 3)], "a1? o0.0=a0 o1.0=a0"),
    C("aten.std_mean", lambda a: aten.std_mean(a, [1]), [(2, 3)], "a1? o0.0=a0 o1.0=a0"),
    C("aten.logsumexp", lambda a: aten.logsumexp(a, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.prod", lambda a: aten.prod(a, 1), [(2, 3)], "a1? o0=a0"),
    C("aten.norm", lambda a: aten.norm(a, 2, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.linalg_vector_norm", lambda a: aten.linalg_vector_norm(a, 2, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.argmax", lambda a: aten.argmax(a, 1), [(2, 3)], "a1? o0=a0"),
    C("aten.argmin", lambda a: aten.argmin(a, 1), [(2, 3)], "a1? o0=a0"),
    C("aten.any", lambda a: aten.any(a, 1), [Bm((2, 3))], "a1? o0=a0"),
    C("aten.all", lambda a: aten.all(a, 1), [Bm((2, 3))], "a1? o0=a0"),
    C("aten.count_nonzero", lambda a: aten.count_nonzero(a, [1]), [(2, 3)], "a1? o0=a0"),
    C("aten.cumsum", lambda a: aten.cumsum(a, 1), [(2, 3)], "a1! a0+ o0=a0 o1=a1"),
    C("aten.cumprod", lambda a: aten.cumprod(a, 0), [(2, 3)], "a0! a1+ o1=a1"),
    C("aten.sort", lambda a: aten.sort(a, 1), [(2, 3)], "a1! a0+ o0.0=a0 o1.0=a0 o0.1!"),
    C("aten.argsort", lambda a: aten.argsort(a, 1), [(2, 3)], "a1! a0+ o0=a0"),
    C("aten.topk", lambda a: aten.topk(a, 2, 1), [(2, 3)], "a1! a0+ o0.0=a0 o1.0=a0 o0.1!"),
    C("aten.diff", lambda a: aten.diff(a, 1, 1), [(2, 3)], "a1! a0+ o0=a0 o1!"),
    C("aten.flip", lambda a: aten.flip(a, [0, 2]), [(2, 3, 4)], "a0! a2! a1+ o1=a1 o0=a0"),
    C("aten.roll", lambda a: aten.roll(a, [1], [0]), [(2, 3)], "a0! a1+ o1=a1"),
    C("aten.roll", lambda a: aten.roll(a, [1]), [(2, 3)], "a0! a1!", note="flattened"),
    C("aten.cummax", lambda a: aten.cummax(a, 1), [(2, 3)], "a1! a0+ o0.0=a0 o1.0=a0"),
    C("aten.cummin", lambda a: aten.cummin(a, 1), [(2, 3)], "a1! a0+ o0.0=a0"),
    # -- views and shapes ----------------------------------------------------------------------------
    C("aten.view", lambda a: aten.view(a, [2, 3, 4]), [(2, 12)], "a1=o1*o2 o0=a0 o1+ o2+"),
    C("aten.view", lambda a: aten.view(a, [2, 12]), [(2, 3, 4)], "o1=a1*a2 o0=a0", note="merge"),
    C("aten.reshape", lambda a: aten.reshape(a, [2, 3, 4]), [(2, 12)], "a1=o1*o2 o0=a0"),
    C("aten._unsafe_view", lambda a: aten._unsafe_view(a, [2, 3, 4]), [(2, 12)], "a1=o1*o2 o0=a0"),
    C("aten._reshape_alias", lambda a: aten._reshape_alias(a, [2, 3, 4], [12, 4, 1]), [(2, 12)], "a1=o1*o2 o0=a0"),
    C("aten.flatten", lambda a: aten.flatten(a, 1, 2), [(2, 3, 4)], "o1=a1*a2 o0=a0"),
    C("aten.unflatten", lambda a: aten.unflatten(a, 1, [3, 4]), [(2, 12)], "a1=o1*o2 o0=a0"),
    C("aten.view_as", lambda a, b: aten.view_as(a, b), [(2, 12), (2, 3, 4)], "a1=o1*o2 o1=b1 o2=b2 o0=b0"),
    C("aten.reshape_as", lambda a, b: aten.reshape_as(a, b), [(2, 12), (2, 3, 4)], "a1=o1*o2 o1=b1 o2=b2"),
    C("aten.squeeze", lambda a: aten.squeeze(a, 1), [(2, 1, 3)], "o0=a0 o1=a2"),
    C("aten.unsqueeze", lambda a: aten.unsqueeze(a, 1), [(2, 3)], "o0=a0 o2=a1"),
    C("aten.transpose", lambda a: aten.transpose(a, 1, 2), [(2, 3, 4)], "o0=a0 o1=a2 o2=a1"),
    C("aten.t", lambda a: aten.t(a), [(2, 3)], "o0=a1 o1=a0"),
    C("aten.swapaxes", lambda a: aten.swapaxes(a, 1, 2), [(2, 3, 4)], "o0=a0 o1=a2 o2=a1"),
    C("aten.swapdims", lambda a: aten.swapdims(a, 1, 2), [(2, 3, 4)], "o0=a0 o1=a2 o2=a1"),
    C("aten.numpy_T", lambda a: aten.numpy_T(a), [(2, 3, 4)], "o0=a2 o1=a1 o2=a0"),
    C("aten.permute", lambda a: aten.permute(a, [2, 0, 1]), [(2, 3, 4)], "o0=a2 o1=a0 o2=a1"),
    C("aten.expand", lambda a: aten.expand(a, [2, 3]), [(1, 3)], "o1=a1 o0!=a0"),
    C("aten.expand_as", lambda a, b: aten.expand_as(a, b), [(1, 3), (2, 3)], "o1=a1 o0=b0 o1=b1"),
    C("aten.broadcast_to", lambda a: aten.broadcast_to(a, [4, 2, 3]), [(2, 3)], "o1=a0 o2=a1"),
    C("aten.repeat", lambda a: aten.repeat(a, [1, 2]), [(2, 3)], "o0=a0 o1=_*a1 a1+"),
    C("aten.repeat", lambda a: aten.repeat(a, [2, 1, 1]), [(2, 3)], "o0! o1=a0 o2=a1 a0+",
      note="new leading axis"),
    C("aten.repeat_interleave.self_int", lambda a: aten.repeat_interleave(a, 2, 1), [(2, 3)],
      "o1=a1*_ o0=a0 a1+"),
    C("aten.cat", lambda a, b: aten.cat([a, b], 1), [(2, 3), (2, 4)], "o1=a1|b1 o0=a0 o0=b0 a1+"),
    C("aten.concat", lambda a, b: aten.concat([a, b], 0), [(2, 3), (4, 3)], "o0=a0|b0 o1=a1 o1=b1"),
    C("aten.concatenate", lambda a, b: aten.concatenate([a, b], 1), [(2, 3), (2, 4)], "o1=a1|b1 o0=a0"),
    C("aten.stack", lambda a, b: aten.stack([a, b], 0), [(2, 3), (2, 3)], "o1=a0 o2=a1 o1=b0 o2=b1 o0!"),
    C("aten.split", lambda a: aten.split(a, 2, 1), [(2, 6)], "a1=o0.1|o1.1|o2.1 o0.0=a0 o2.0=a0"),
    C("aten.split_with_sizes", lambda a: aten.split_with_sizes(a, [2, 4], 1), [(2, 6)], "a1=o0.1|o1.1 o1.0=a0"),
    C("aten.chunk", lambda a: aten.chunk(a, 2, 1), [(2, 6)], "a1=o0.1|o1.1 o0.0=a0"),
    C("aten.unbind", lambda a: aten.unbind(a, 0), [(2, 3)], "a0! o0.0=a1 o1.0=a1"),
    C("aten.tensor_split", lambda a: aten.tensor_split(a, 3, 1), [(2, 6)], "a1=o0.1|o1.1|o2.1 o1.0=a0"),
    C("aten.slice", lambda a: aten.slice(a, 1, 1, 4), [(2, 6)], "a1=_|o1|_ o0=a0 o1+"),
    C("aten.slice", lambda a: aten.slice(a, 1, 1, 9223372036854775807, 2), [(2, 6)], "a1=o1*_ o1+",
      note="every second element"),
    C("aten.slice", lambda a: aten.slice(a, 1, 0, 3, 2), [(2, 6)], "a1! o1!", note="stride over a part"),
    C("aten.narrow", lambda a: aten.narrow(a, 1, 1, 3), [(2, 6)], "a1! o1! o0=a0"),
    C("aten.select", lambda a: aten.select(a, 0, 1), [(2, 3)], "a0! o0=a1"),
    C("aten.constant_pad_nd", lambda a: aten.constant_pad_nd(a, [1, 2]), [(2, 3)], "o1=_|a1|_ o0=a0 a1+"),
    C("aten.pad", lambda a: aten.pad(a, [1, 2], "constant", 0.0), [(2, 3)], "o1=_|a1|_ o0=a0"),
    # -- pooling and upsampling: channels and batch pass through, spatial axes follow the input ------
    C("aten.max_pool1d", lambda a: aten.max_pool1d(a, [2]), [(2, 3, 8)], "o0=a0 o1=a1 o2!"),
    C("aten.max_pool2d", lambda a: aten.max_pool2d(a, [2, 2]), [(2, 3, 8, 6)], "o0=a0 o1=a1 o2! o3!"),
    C("aten.max_pool3d", lambda a: aten.max_pool3d(a, [2, 2, 2]), [(2, 3, 4, 6, 8)], "o1=a1 o4!"),
    C("aten.avg_pool1d", lambda a: aten.avg_pool1d(a, [2]), [(2, 3, 8)], "o0=a0 o1=a1 o2!"),
    C("aten.avg_pool2d", lambda a: aten.avg_pool2d(a, [2, 2]), [(2, 3, 8, 6)], "o1=a1 o3!"),
    C("aten.avg_pool3d", lambda a: aten.avg_pool3d(a, [2, 2, 2]), [(2, 3, 4, 6, 8)], "o1=a1 o4!"),
    C("aten.adaptive_avg_pool1d", lambda a: aten.adaptive_avg_pool1d(a, [2]), [(2, 3, 8)], "o0=a0 o1=a1 o2!"),
    C("aten.adaptive_avg_pool2d", lambda a: aten.adaptive_avg_pool2d(a, [2, 2]), [(2, 3, 8, 6)], "o1=a1 o3!"),
    C("aten.adaptive_avg_pool3d", lambda a: aten.adaptive_avg_pool3d(a, [2, 2, 2]), [(2, 3, 4, 6, 8)], "o1=a1 o4!"),
    C("aten.adaptive_max_pool1d", lambda a: aten.adaptive_max_pool1d(a, [2]), [(2, 3, 8)], "o0.1=a1 o1.1=a1 o0.2!"),
    C("aten.adaptive_max_pool2d", lambda a: aten.adaptive_max_pool2d(a, [2, 2]), [(2, 3, 8, 6)], "o0.1=a1 o0.3!"),
    C("aten.max_pool2d_with_indices", lambda a: aten.max_pool2d_with_indices(a, [2, 2]), [(2, 3, 8, 6)],
      "o0.0=a0 o0.1=a1 o1.1=a1 o0.3!"),
    C("aten.upsample_nearest2d", lambda a: aten.upsample_nearest2d(a, [4, 6]), [(2, 3, 2, 3)], "o0=a0 o1=a1 o2! o3!"),
    C("aten.upsample_bilinear2d", lambda a: aten.upsample_bilinear2d(a, [4, 6], False), [(2, 3, 2, 3)],
      "o1=a1 o2! o3!"),
    C("aten._adaptive_avg_pool2d", lambda a: aten._adaptive_avg_pool2d(a, [2, 2]), [(2, 3, 8, 6)], "o1=a1 o3!"),
    # -- indexing: axes indexed by data are frozen, the others pass through --------------------------
    C("aten.index_select", lambda a, b: aten.index_select(a, 1, b), [(2, 5), L(0, 3)], "a1! o1=b0 o0=a0"),
    C("aten.index", lambda a, b: aten.index(a, [b]), [(5, 3), L(0, 3)], "a0! o0=b0 o1=a1 a1+"),
    C("aten._unsafe_index", lambda a, b: aten._unsafe_index(a, [None, b]), [(2, 5), L(0, 3)], "a1! o0=a0 o1=b0"),
    C("aten.gather", lambda a, b: aten.gather(a, 1, b), [(2, 5), Lk((2, 3), 5)], "a1! a0=b0 o0=b0 o1=b1"),
    C("aten.scatter", lambda a, b, c: aten.scatter(a, 1, b, c), [(2, 5), Lk((2, 3), 5), (2, 3)],
      "a1! b0=c0 b1=c1 a0=c0 o0=a0 o1=a1"),
    C("aten.scatter_", lambda a, b, c: aten.scatter_(cl(a), 1, b, c), [(2, 5), Lk((2, 3), 5), (2, 3)],
      "a1! b1=c1 a0=c0 o1=a1"),
    C("aten.scatter_add", lambda a, b, c: aten.scatter_add(a, 1, b, c), [(2, 5), Lk((2, 3), 5), (2, 3)],
      "a1! b1=c1 a0=c0 o1=a1"),
    C("aten.scatter_add_", lambda a, b, c: aten.scatter_add_(cl(a), 1, b, c), [(2, 5), Lk((2, 3), 5), (2, 3)],
      "a1! b1=c1 a0=c0 o1=a1"),
    C("aten.scatter_reduce", lambda a, b, c: aten.scatter_reduce(a, 1, b, c, "sum"), [(2, 5), Lk((2, 3), 5), (2, 3)],
      "a1! b1=c1 a0=c0 o1=a1"),
    C("aten.scatter_reduce_", lambda a, b, c: aten.scatter_reduce_(cl(a), 1, b, c, "amax"),
      [(2, 5), Lk((2, 3), 5), (2, 3)], "a1! b1=c1 a0=c0 o1=a1"),
    C("aten.index_add", lambda a, b, c: aten.index_add(a, 0, b, c), [(5, 3), L(0, 3), (2, 3)],
      "a0! c0=b0 a1=c1 a1+ o0=a0 o1=a1"),
    C("aten.index_add_", lambda a, b, c: aten.index_add_(cl(a), 0, b, c), [(5, 3), L(0, 3), (2, 3)],
      "a0! c0=b0 a1=c1 o1=a1"),
    C("aten.index_copy", lambda a, b, c: aten.index_copy(a, 0, b, c), [(5, 3), L(0, 3), (2, 3)], "a0! c0=b0 a1=c1"),
    C("aten.index_copy_", lambda a, b, c: aten.index_copy_(cl(a), 0, b, c), [(5, 3), L(0, 3), (2, 3)],
      "a0! c0=b0 a1=c1"),
    C("aten.index_reduce", lambda a, b, c: aten.index_reduce(a, 0, b, c, "prod"), [(5, 3), L(0, 3), (2, 3)],
      "a0! c0=b0 a1=c1"),
    C("aten.index_reduce_", lambda a, b, c: aten.index_reduce_(cl(a), 0, b, c, "amax"), [(5, 3), L(0, 3), (2, 3)],
      "a0! c0=b0 a1=c1"),
    C("aten.index_fill", lambda a, b: aten.index_fill(a, 1, b, 0.0), [(2, 5), L(0, 3)], "a1! a0+ o0=a0 o1=a1"),
    C("aten.index_fill_", lambda a, b: aten.index_fill_(cl(a), 1, b, 0.0), [(2, 5), L(0, 3)], "a1! o0=a0"),
    C("aten.segment_reduce", lambda a, b: aten.segment_reduce(a, "sum", lengths=b), [(5, 3), L(2, 3)],
      "a0! o0! o1=a1 a1+"),
    C("aten.index_put", lambda a, b, c: aten.index_put(a, [b], c), [(5, 3), L(0, 3), (2, 3)], "a0! a1=c1 o0=a0"),
    C("aten.index_put_", lambda a, b, c: aten.index_put_(cl(a), [b], c), [(5, 3), L(0, 3), (2, 3)], "a0! a1=c1"),
    C("aten._index_put_impl_", lambda a, b, c: aten._index_put_impl_(cl(a), [b], c), [(5, 3), L(0, 3), (2, 3)],
      "a0! a1=c1"),
    C("aten.masked_scatter", lambda a, b, c: aten.masked_scatter(a, b, c), [(2, 3), Bm((2, 3)), (6,)],
      "a0! a1! o0=a0"),
    C("aten.masked_select", lambda a, b: aten.masked_select(a, b), [(2, 3), Bm((2, 3))], "a0! a1! o0!"),
    C("aten.histc", lambda a: aten.histc(a, 4), [(5,)], "a0! o0!"),
    C("transformers.grouped_mm_fallback", lambda a, b, c: torch.ops.transformers.grouped_mm_fallback(a, b, c),
      [(6, 3), (2, 3, 4), L(2, 6)], "a1=b1 b0! c0! o0=a0 o1=b2 a0+ b2+"),
    C("aten.embedding", lambda a, b: aten.embedding(a, b), [(7, 3), Lk((2, 4), 7)], "a0! a1+ o0=b0 o1=b1 o2=a1"),
    # -- creation: constant values whose sizes follow the axes they meet ------------------------------
    C("aten.zeros", lambda: aten.zeros([2, 3]), [], "o0+ o1+"),
    C("aten.ones", lambda: aten.ones([2, 3]), [], "o0+ o1+"),
    C("aten.full", lambda: aten.full([2, 3], 1.5), [], "o0+ o1+"),
    C("aten.empty", lambda: aten.empty([2, 3]), [], "o0+"),
    C("aten.new_zeros", lambda a: aten.new_zeros(a, [4, 5]), [(2, 3)], "o0+ o1+"),
    C("aten.new_ones", lambda a: aten.new_ones(a, [4, 5]), [(2, 3)], "o0+ o1+"),
    C("aten.new_full", lambda a: aten.new_full(a, [4, 5], 2.0), [(2, 3)], "o0+"),
    C("aten.new_empty", lambda a: aten.new_empty(a, [4, 5]), [(2, 3)], "o0+"),
    C("aten.zeros_like", lambda a: aten.zeros_like(a), [(2, 3)], "o0=a0 o1=a1 a1+"),
    C("aten.ones_like", lambda a: aten.ones_like(a), [(2, 3)], "o0=a0 o1=a1"),
    C("aten.full_like", lambda a: aten.full_like(a, 2.0), [(2, 3)], "o0=a0 o1=a1"),
    C("aten.empty_like", lambda a: aten.empty_like(a), [(2, 3)], "o0=a0 o1=a1"),
    C("aten.rand", lambda: aten.rand([2, 3]), [], "o0+ o1+"),
    C("aten.randn", lambda: aten.randn([2, 3]), [], "o0+ o1+"),
    C("aten.rand_like", lambda a: aten.rand_like(a), [(2, 3)], "o0=a0 o1=a1"),
    C("aten.randn_like", lambda a: aten.randn_like(a), [(2, 3)], "o0=a0 o1=a1"),
    C("aten.scalar_tensor", lambda a: aten.mul(a, aten.scalar_tensor(2.0)), [(2, 3)], ""),
    C("aten.arange", lambda: aten.arange(5), [], "o0+"),
    C("aten.arange", lambda a: aten.mul(a, aten.arange(1, 9, 2)), [(4,)], "o0=a0 a0+", note="start, step"),
    C("aten.tril", lambda a: aten.tril(a), [(3, 4)], "a0! a1! o0=a0 o1=a1"),
    C("aten.triu", lambda a: aten.triu(a), [(3, 4)], "a0! a1! o0=a0"),
    C("aten.eye", lambda: aten.eye(3), [], "o0! o1!"),
    C("aten.tril_", lambda a: aten.tril_(cl(a)), [(3, 4)], "a0! a1! o1=a1"),
    C("aten.triu_", lambda a: aten.triu_(cl(a)), [(3, 4)], "a0! a1! o1=a1"),
    C("aten.copy_", lambda a, b: aten.copy_(cl(a), b), [(2, 3), (3,)], "o0=a0 o1=a1 b0=a1 a1+"),
    C("aten.copy", lambda a, b: aten.copy(a, b), [(2, 3), (3,)], "o0=a0 o1=a1 b0=a1"),
]

# Pointwise ops with broadcasting: a (2, 3) and, for binary ops, b (3,) broadcast into it.
_UNARY = "o0=a0 o1=a1 a0+ a1+"
_BINARY = "o0=a0 o1=a1 b0=a1 a1+"
CASES += [
    C("aten.dropout", lambda a: aten.dropout(a, 0.5, True), [(2, 3)], _UNARY),
    C("aten.where", lambda a, b, c: aten.where(a, b, c), [Bm((2, 3)), (2, 3), (3,)], "o0=a0 o0=b0 o1=c0 a1=b1"),
    C("aten.clamp", lambda a: aten.clamp(a, -1.0, 1.0), [(2, 3)], _UNARY),
    C("aten.clamp_min", lambda a: aten.clamp_min(a, 0.0), [(2, 3)], _UNARY),
    C("aten.clamp_max", lambda a: aten.clamp_max(a, 0.0), [(2, 3)], _UNARY),
    C("aten.masked_fill", lambda a, b: aten.masked_fill(a, b, 0.0), [(2, 3), Bm((3,))], _BINARY),
    C("aten.masked_fill_", lambda a, b: aten.masked_fill_(cl(a), b, 0.0), [(2, 3), Bm((3,))], _BINARY, note=IN_PLACE),
    C("aten.native_dropout", lambda a: aten.native_dropout(a, 0.5, True), [(2, 3)], "o0.0=a0 o0.1=a1 o1.1=a1"),
    C("aten.feature_dropout", lambda a: aten.feature_dropout(a, 0.5, True), [(2, 3)], _UNARY),
    C("aten.alpha_dropout", lambda a: aten.alpha_dropout(a, 0.5, True), [(2, 3)], _UNARY),
    C("aten.lerp", lambda a, b: aten.lerp(a, b, 0.3), [(2, 3), (3,)], _BINARY),
    C("aten.addcmul", lambda a, b, c: aten.addcmul(a, b, c), [(2, 3), (3,), (2, 1)], "o0=a0 o1=a1 b0=a1 c0=a0"),
    C("aten.addcdiv", lambda a, b, c: aten.addcdiv(a, b, c), [(2, 3), (3,), (2, 1)], "o0=a0 o1=a1 b0=a1 c0=a0"),
    C("aten.hardtanh", lambda a: aten.hardtanh(a), [(2, 3)], _UNARY),
    C("aten.hardtanh_", lambda a: aten.hardtanh_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.gelu", lambda a: aten.gelu(a), [(2, 3)], _UNARY),
    C("aten.silu", lambda a: aten.silu(a), [(2, 3)], _UNARY),
    C("aten.mish", lambda a: aten.mish(a), [(2, 3)], _UNARY),
    C("aten.softplus", lambda a: aten.softplus(a), [(2, 3)], _UNARY),
    C("aten.elu", lambda a: aten.elu(a), [(2, 3)], _UNARY),
    C("aten.leaky_relu", lambda a: aten.leaky_relu(a), [(2, 3)], _UNARY),
    C("aten.hardswish", lambda a: aten.hardswish(a), [(2, 3)], _UNARY),
    C("aten.hardsigmoid", lambda a: aten.hardsigmoid(a), [(2, 3)], _UNARY),
    C("aten.relu6", lambda a: aten.relu6(a), [(2, 3)], _UNARY),
    C("aten.celu", lambda a: aten.celu(a), [(2, 3)], _UNARY),
    C("aten.selu", lambda a: aten.selu(a), [(2, 3)], _UNARY),
    C("aten.__and__", lambda a, b: aten.__and__(a, b), [Bm((2, 3)), Bm((3,))], _BINARY),
    C("aten.__or__", lambda a, b: aten.__or__(a, b), [Bm((2, 3)), Bm((3,))], _BINARY),
    C("aten.__xor__", lambda a, b: aten.__xor__(a, b), [Bm((2, 3)), Bm((3,))], _BINARY),
    C("aten.logical_not", lambda a: aten.logical_not(a), [Bm((2, 3))], _UNARY),
    C("aten.type_as", lambda a, b: aten.type_as(a, b), [(2, 3), (4,)], "o0=a0 o1=a1 b0!=a1"),
    C("aten.nan_to_num", lambda a: aten.nan_to_num(a), [(2, 3)], _UNARY),
    C("aten.pow", lambda a, b: aten.pow(a, b), [(2, 3), (3,)], _BINARY),
    C("aten.pow_", lambda a: aten.pow_(cl(a), 2.0), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.fill_", lambda a: aten.fill_(cl(a), 1.0), [(2, 3)], _UNARY),
    C("aten.fill", lambda a: aten.fill(a, 1.0), [(2, 3)], _UNARY),
    C("aten.zero_", lambda a: aten.zero_(cl(a)), [(2, 3)], _UNARY),
    C("aten.bernoulli", lambda a: aten.bernoulli(a), [(2, 3)], _UNARY),
    C("aten.bernoulli_", lambda a: aten.bernoulli_(cl(a), 0.5), [(2, 3)], _UNARY),
    C("aten.threshold", lambda a: aten.threshold(a, 0.0, 0.0), [(2, 3)], _UNARY),
    C("aten.rsub", lambda a, b: aten.rsub(a, b), [(2, 3), (3,)], _BINARY),
    C("aten.floor_divide", lambda a, b: aten.floor_divide(a, b), [(2, 3), (3,)], _BINARY),
    C("aten.remainder", lambda a, b: aten.remainder(a, b), [(2, 3), (3,)], _BINARY),
    C("aten.fmod", lambda a, b: aten.fmod(a, b), [(2, 3), (3,)], _BINARY),
    C("aten.add_", lambda a, b: aten.add_(cl(a), b), [(2, 3), (3,)], _BINARY, note=IN_PLACE),
    C("aten.sub_", lambda a, b: aten.sub_(cl(a), b), [(2, 3), (3,)], _BINARY, note=IN_PLACE),
    C("aten.mul_", lambda a, b: aten.mul_(cl(a), b), [(2, 3), (3,)], _BINARY, note=IN_PLACE),
    C("aten.div_", lambda a, b: aten.div_(cl(a), b), [(2, 3), (3,)], _BINARY, note=IN_PLACE),
    C("aten.clamp_", lambda a: aten.clamp_(cl(a), -1.0, 1.0), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.clamp_min_", lambda a: aten.clamp_min_(cl(a), 0.0), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.clamp_max_", lambda a: aten.clamp_max_(cl(a), 0.0), [(2, 3)], _UNARY, note=IN_PLACE),
    # no table entry: found through the torch.Tag.pointwise tag
    C("aten.sub", lambda a, b: aten.sub(a, b), [(2, 3), (3,)], _BINARY, note="pointwise tag"),
    # copies, casts and in-place ops on `self`: the output is the input
    C("aten.to", lambda a: aten.to(a, torch.float64), [(2, 3)], _UNARY),
    C("aten._to_copy", lambda a: aten._to_copy(a, dtype=torch.float64), [(2, 3)], _UNARY),
    C("aten.contiguous", lambda a: aten.contiguous(a), [(2, 3)], _UNARY),
    C("aten.clone", lambda a: aten.clone(a), [(2, 3)], _UNARY),
    C("aten.detach", lambda a: aten.detach(a), [(2, 3)], _UNARY),
    C("aten.detach_", lambda a: aten.detach_(cl(a)), [(2, 3)], _UNARY),
    C("aten.alias", lambda a: aten.alias(a), [(2, 3)], _UNARY),
    C("aten.lift_fresh_copy", lambda a: aten.lift_fresh_copy(a), [(2, 3)], _UNARY),
    C("aten.lift_fresh", lambda a: aten.lift_fresh.default(a), [(2, 3)], _UNARY, trace="fx"),
    C("aten.requires_grad_", lambda a: aten.requires_grad_(cl(a), False), [(2, 3)], _UNARY),
    C("aten.relu_", lambda a: aten.relu_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.sigmoid_", lambda a: aten.sigmoid_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.tanh_", lambda a: aten.tanh_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.neg_", lambda a: aten.neg_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.exp_", lambda a: aten.exp_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.sqrt_", lambda a: aten.sqrt_(cl(a)), [(2, 3)], _UNARY, note=IN_PLACE),
    C("aten.dropout_", lambda a: aten.dropout_(cl(a), 0.5, True), [(2, 3)], _UNARY),
    C("aten.resolve_conj", lambda a: aten.resolve_conj(a), [(2, 3)], _UNARY),
    C("aten.resolve_neg", lambda a: aten.resolve_neg(a), [(2, 3)], _UNARY),
    C("aten.positive", lambda a: aten.positive(a), [(2, 3)], _UNARY),
    C("aten.prelu", lambda a, b: aten.prelu(a, b), [(2, 3, 4), (3,)], "a1=b0 o1=a1 o0=a0 o2=a2"),
    C("aten._prelu_kernel", lambda a, b: aten._prelu_kernel(a, b), [(2, 3, 4), (3, 1)], "a1=b0 o1=a1"),
    C("getitem", lambda a: aten.max.dim(a, 1)[0], [(2, 3)], "o0=a0"),
]

# Ops that return no tensor: asserts, size queries, scalars. Their rule declares no axes (o=-).
CASES += [
    C("aten._assert_tensor_metadata", lambda a: (aten._assert_tensor_metadata(a, dtype=F32), a)[1], [(2, 3)], "o=-"),
    C("aten._assert_scalar", lambda a: (aten._assert_scalar(aten.item(aten.sum(a)) > -1e9, "finite"), a)[1],
      [(2, 3)], "o=-"),
    C("aten.sym_constrain_range", lambda a: aten.sym_constrain_range.default(aten.sym_size.int(a, 0), min=0, max=9),
      [(2, 3)], "o=-", trace="fx"),
    C("aten.sym_constrain_range_for_size",
      lambda a: aten.sym_constrain_range_for_size.default(aten.sym_size.int(a, 0)), [(2, 3)], "o=-", trace="fx"),
    C("aten._assert_async", lambda a: (aten._assert_async(aten.any(a)), a)[1], [Bm((3,))], "o=-"),
    C("aten.sym_size", lambda a: aten.sym_size.int(a, 0), [(2, 3)], "o=-", trace="fx"),
    C("aten.sym_numel", lambda a: aten.sym_numel.default(a), [(2, 3)], "o=-", trace="fx"),
    C("aten.sym_stride", lambda a: aten.sym_stride.int(a, 0), [(2, 3)], "o=-", trace="fx"),
    C("aten.sym_storage_offset", lambda a: aten.sym_storage_offset.default(a), [(2, 3)], "o=-", trace="fx"),
    C("aten._local_scalar_dense", lambda a: aten.mul(a, aten._local_scalar_dense(aten.sum(a))), [(2, 3)], "o=-"),
    C("aten.item", lambda a: aten.mul(a, aten.item(aten.sum(a))), [(2, 3)], "o=-"),
    C("aten._functional_assert_async",
      lambda a: (aten._functional_assert_async.msg(aten.any(a), "ok", aten._make_dep_token()), a)[1], [Bm((3,))],
      "o=-"),
    C("aten._print", lambda a: (aten._print("hello"), a)[1], [(2, 3)], "o=-"),
]


# Python arithmetic on sizes, which export records on dynamic shapes (here a torch.fx trace of a size query
# records it): no tensor axes.
def _size(a: torch.Tensor) -> Any:
    return aten.sym_size.int(a, 0)


CASES += [C(name, lambda a, f=f: f(_size(a)), [(3, 4)], "o=-", trace="fx") for name, f in [
    ("add", lambda n: n + 1), ("sub", lambda n: n - 1), ("mul", lambda n: n * 2), ("floordiv", lambda n: n // 2),
    ("truediv", lambda n: n / 2), ("mod", lambda n: n % 2), ("neg", lambda n: -n), ("ge", lambda n: n >= 2),
    ("gt", lambda n: n > 2), ("le", lambda n: n <= 2), ("lt", lambda n: n < 2), ("eq", lambda n: n == 2),
    ("ne", lambda n: n != 2), ("pow", lambda n: n ** 2), ("and_", lambda n: (n > 1) & (n < 9)),
    ("or_", lambda n: (n > 1) | (n < 9)), ("sym_float", torch.sym_float), ("sym_int", lambda n: torch.sym_int(n / 2)),
    ("sym_max", lambda n: torch.sym_max(n, 2)), ("sym_min", lambda n: torch.sym_min(n, 2)),
    ("sym_not", lambda n: torch.sym_not(n > 2)), ("sym_ite", lambda n: torch.sym_ite(n > 2, n, n + 1)),
    ("_sym_sqrt", torch.sym_sqrt),
]]


# -- running the cases -------------------------------------------------------------------------------
class _Call(nn.Module):
    """One case: its operands as buffers (every axis a named state axis), its call as the forward."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.call = case.call
        self.names = []
        for name, spec in zip("abcdefgh", case.operands):
            tensor = spec if isinstance(spec, torch.Tensor) else torch.randn(spec, generator=_gen())
            self.register_buffer(name, tensor.clone())
            self.names.append(name)

    def forward(self) -> Any:
        return self.call(*[getattr(self, n) for n in self.names])


class _Line(nn.Module):
    def __init__(self, cases: list[Case]) -> None:
        super().__init__()
        self.cases = nn.ModuleList([_Call(c) for c in cases])

    def forward(self) -> tuple:
        return tuple(m() for m in self.cases)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _line_of(case: Case) -> str:
    """Cases of one table line share a capture (the line's rule function names it)."""
    if case.trace == "fx":
        return f"fx:{case.id}"
    rule = BUILTIN_RULES.get(case.op)
    return rule.__name__ if rule is not None else case.op


BUILTIN_RULES = dict(RULES)  # before any test registers a rule
_LINES: dict[str, list[Case]] = {}
for _case in CASES:
    _LINES.setdefault(_line_of(_case), []).append(_case)
_CAPTURES: dict[str, tuple[fx.GraphModule, AnalysisResult]] = {}


class _RecordValues(fx.Interpreter):
    """Run a traced graph once, keeping each node's value as its ``val`` (what export records)."""

    def run_node(self, node: fx.Node) -> Any:
        node.meta["val"] = super().run_node(node)
        return node.meta["val"]


def _capture(line: str) -> fx.GraphModule:
    """torch.export, as istfx captures models; "fx" cases are traced with torch.fx instead.

    On static shapes export folds size queries and asserts into constants, and drops
    lift_fresh: a torch.fx trace keeps the op exactly as called.
    """
    module = _Line(_LINES[line])
    if line.startswith("fx:"):
        tracer = fx.Tracer()
        tracer.proxy_buffer_attributes = True  # the operands are buffers: read them as get_attr nodes
        gm = fx.GraphModule(module, tracer.trace(module))
        _RecordValues(gm).run()
        return gm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (), strict=False).module()


def _analysed(line: str) -> tuple[fx.GraphModule, AnalysisResult]:
    """Capture and analyse one table line's module once per session."""
    if line not in _CAPTURES:
        gm = _capture(line)
        _CAPTURES[line] = gm, AxisAnalysis(gm).run()
    return _CAPTURES[line]


def _matches(node: fx.Node, op: str) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and op == f"{op_name(node)}.{target._overloadname}":
        return True
    return op_name(node) == op


def _node_of(gm, case: Case, index: int):
    """The last node of `case`'s op inside its submodule (an in-place op's clone comes before it)."""
    path = f"cases.{index}"
    found = [n for n in gm.graph.nodes
             if n.op == "call_function" and _matches(n, case.op)
             and (case.trace == "fx" or any(p == path for p, _ in (n.meta.get("nn_module_stack") or {}).values()))]
    assert found, f"the capture of {case.id} has no {case.op} node: " + ", ".join(
        str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return found[-1]


_REF = re.compile(r"([a-ho])(\d+)(?:\.(\d+))?")


class _Axes:
    """Axis names of one case (``a1``, ``o0``, ``o1.2``) -> atoms of the analysis."""

    def __init__(self, result: AnalysisResult, index: int, out: Any) -> None:
        self.result, self.index, self.out = result, index, out

    def atom(self, ref: str) -> int:
        match = _REF.fullmatch(ref)
        assert match, f"bad axis name {ref!r}"
        who, i, j = match.groups()
        if who == "o":
            assert self.out is not None, "the op has no tensor output"
            axes, k = (self.out[int(i)], int(j)) if j is not None else (self.out, int(i))
        else:
            axes, k = self.result.state[f"cases.{self.index}.{who}"].axes, int(i)
        return axes[k]

    def root(self, ref: str) -> int:
        return self.result.alg.find(self.atom(ref))


def _frozen_by_op(alg, atom: int) -> list[str]:
    return [r for r in alg.flags(atom).frozen if r not in _BOUNDARY]


def _check(axes: _Axes, clause: str) -> None:
    alg = axes.result.alg
    if clause == "o=-":
        assert axes.out is None, f"expected no tensor output, got axes {axes.out}"
    elif clause.endswith("!") and "=" not in clause:
        assert _frozen_by_op(alg, axes.atom(clause[:-1])), f"{clause[:-1]} is not frozen by the op"
    elif clause.endswith("?"):
        assert alg.flags(axes.atom(clause[:-1])).approximate, f"{clause[:-1]} is not approximate"
    elif clause.endswith("+"):
        atom = axes.atom(clause[:-1])
        assert not _frozen_by_op(alg, atom), f"{clause[:-1]} is frozen: {_frozen_by_op(alg, atom)}"
        assert not alg.flags(atom).approximate, f"{clause[:-1]} is approximate: {alg.flags(atom).approximate}"
    elif "!=" in clause:
        lhs, rhs = clause.split("!=")
        assert axes.root(lhs) != axes.root(rhs), f"{lhs} and {rhs} are one axis"
    else:
        lhs, rhs = clause.split("=")
        kind = PRODUCT if "*" in rhs else CONCAT if "|" in rhs else None
        if kind is None:
            assert axes.root(lhs) == axes.root(rhs), f"{lhs} and {rhs} are not one axis"
            return
        parts = rhs.split("*" if kind == PRODUCT else "|")
        ref = alg.refinement(axes.atom(lhs))
        assert ref is not None and ref.kind == kind, f"{lhs} is not a {kind}: {ref}"
        assert len(ref.children) == len(parts), f"{lhs} is a {kind} of {len(ref.children)} parts: {ref}"
        for part, child in zip(parts, ref.children):
            if part != "_":
                assert axes.root(part) == alg.find(child), f"{part} is not the {kind} part {child} of {lhs}"


def _ranks(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return val.dim()
    if isinstance(val, (tuple, list)):
        return [_ranks(v) for v in val]
    return None


def _axes_ranks(axes: Any, like: Any) -> Any:
    """The ranks the rule's output axes describe, shaped like `like` (the output's ranks)."""
    if isinstance(like, list):
        if not isinstance(axes, list) or len(axes) != len(like):
            return axes
        return [_axes_ranks(a, r) for a, r in zip(axes, like)]
    if like is None:
        return None
    return len(axes) if isinstance(axes, list) else axes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    line = _line_of(case)
    gm, result = _analysed(line)
    index = _LINES[line].index(case)
    node = _node_of(gm, case, index)
    assert not [d for d in result.diagnostics if d.node == node.name], result.diagnostics
    out = result.node_axes[("", node.name)]
    ranks = _ranks(node.meta.get("val"))
    if case.expect != "o=-":
        assert _axes_ranks(out, ranks) == ranks, f"output axes {out} do not match the output's ranks {ranks}"
    axes = _Axes(result, index, out)
    for clause in case.expect.split():
        _check(axes, clause)


def test_every_table_op_has_a_case() -> None:
    """A new rule-table line needs a case here: one ``C(...)`` line in ``CASES``."""
    missing = sorted(set(BUILTIN_RULES) - {c.op for c in CASES})
    assert not missing, f"rule-table ops without a case in tests/test_rules.py CASES: {missing}"


def test_every_case_is_a_table_op() -> None:
    stale = sorted({c.op for c in CASES if c.op not in BUILTIN_RULES and c.note not in ("pointwise tag", IN_PLACE)})
    assert not stale, f"cases for ops the rule table does not name: {stale}"
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


# -- register_rule -----------------------------------------------------------------------------------
@torch.library.custom_op("istfx_test_rules::fused_linear", mutates_args=())
def fused_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T): an op istfx has no rule for."""
    return torch.nn.functional.gelu(x @ weight.t())


@fused_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class FusedMLP(nn.Module):
    """8 hidden units into the custom op, 6 out of it, then 7 hidden units of a plain MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 8)
        self.w = nn.Parameter(torch.randn(6, 8) / 3)
        self.fc3 = nn.Linear(6, 7)
        self.fc4 = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fused_linear(torch.relu(self.fc1(x)), self.w)  # the custom op's line
        return self.fc4(torch.relu(self.fc3(h)))


FUSED = "istfx_test_rules.fused_linear"


def fused_rule(ctx: istfx.OpContext) -> None:
    """The custom op contracts x's last axis with weight's axis 1, like a linear layer."""
    x, w = ctx.axes("x"), ctx.axes("weight")
    ctx.same(x[-1], w[1])
    ctx.output([*x[:-1], w[0]])


@pytest.fixture
def rules():
    """The rule table, restored after the test."""
    saved = dict(RULES)
    yield RULES
    RULES.clear()
    RULES.update(saved)


def _compile(strict: bool = False) -> istfx.ISTModel:
    return istfx.compile(FusedMLP(), subnets=2, example_inputs=torch.randn(4, 3), strict=strict)


def _root(ist: istfx.ISTModel, tensor: str, dim: int) -> int:
    return ist.analysis.alg.find(ist.analysis.state[tensor].axes[dim])


def _split_tensors(ist: istfx.ISTModel) -> set[tuple[str, int]]:
    return {(m.tensor, m.dim) for g in ist.plan.split for m in ist.plan.groups[g].members}


def test_registered_rule_couples_the_custom_ops_axes(rules) -> None:
    assert istfx.register_rule(FUSED, fused_rule) is fused_rule
    ist = _compile(strict=True)  # no op without a rule is left
    assert not ist.plan.diagnostics
    assert _root(ist, "fc1.weight", 0) == _root(ist, "w", 1) == _root(ist, "fc1.bias", 0)  # contraction
    assert _root(ist, "w", 0) == _root(ist, "fc3.weight", 1)  # the op's output axis
    assert {("fc1.weight", 0), ("w", 1), ("w", 0), ("fc3.weight", 1)} <= _split_tensors(ist)
    subnets = ist.decompose(0)
    assert [tuple(s.get_parameter("w").shape) for s in subnets] == [(3, 4), (3, 4)]
    assert subnets[0](torch.randn(5, 3)).shape == (5, 2)
    assert ist.plan.diagnostics == [] and ("fc3.weight", 0) in _split_tensors(ist)


def test_unknown_op_freezes_its_axes_and_names_the_op_and_line(rules) -> None:
    assert FUSED not in rules
    ist = _compile()
    found = [d for d in ist.plan.diagnostics if d.op == FUSED]
    assert len(found) == 1, ist.plan.diagnostics
    lines, start = inspect.getsourcelines(FusedMLP.forward)
    line = start + next(i for i, text in enumerate(lines) if "the custom op's line" in text)
    assert f"test_rules.py:{line}" in found[0].source, found[0].source
    for tensor, dim in [("w", 0), ("w", 1), ("fc1.weight", 0)]:
        assert any(FUSED in r for r in ist.analysis.alg.flags(ist.analysis.state[tensor].axes[dim]).frozen)
    assert not {("w", 0), ("w", 1), ("fc1.weight", 0), ("fc3.weight", 1)} & _split_tensors(ist)
    assert ("fc3.weight", 0) in _split_tensors(ist)  # the rest of the model still splits
    with pytest.raises(istfx.UnsupportedOpError, match=FUSED.replace(".", r"\.")):
        _compile(strict=True)


def test_exact_overload_rule_wins_and_re_registering_replaces(rules) -> None:
    def frozen(ctx: istfx.OpContext) -> None:
        for a in [*ctx.axes("x"), *ctx.axes("weight")]:
            ctx.freeze(a, "kept whole on purpose")
        ctx.output(ctx.fresh(ctx.out_dims()))

    istfx.register_rule(FUSED, fused_rule)
    decorated = istfx.register_rule(torch.ops.istfx_test_rules.fused_linear.default)(frozen)
    assert decorated is frozen and rules[f"{FUSED}.default"] is frozen
    ist = _compile()
    assert ("w", 0) not in _split_tensors(ist)
    assert any("kept whole on purpose" in r for r in ist.analysis.alg.flags(ist.analysis.state["w"].axes[0]).frozen)
    istfx.register_rule(torch.ops.istfx_test_rules.fused_linear.default, fused_rule)  # replaces `frozen`
    assert ("w", 0) in _split_tensors(_compile())


def test_registering_a_builtin_op_overrides_its_rule(rules) -> None:
    def linear_keeps_outputs_whole(ctx: istfx.OpContext) -> None:
        BUILTIN_RULES["aten.linear"](ctx)
        ctx.freeze(ctx.axes("weight")[0], "outputs kept whole")

    istfx.register_rule(torch.ops.aten.linear, linear_keeps_outputs_whole)  # an OpOverloadPacket
    assert rules["aten.linear"] is linear_keeps_outputs_whole
    istfx.register_rule(FUSED, fused_rule)
    ist = _compile()
    assert not {("fc1.weight", 0), ("w", 1), ("fc3.weight", 0)} & _split_tensors(ist)  # linear outputs kept whole
    assert ("w", 0) in _split_tensors(ist)  # the custom op's outputs still split
