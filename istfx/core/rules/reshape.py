"""The reshape algebra: how a view regroups axes, and how its size constants follow."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch.fx as fx

from ..axes import PRODUCT
from .context import OpContext, Rewriter, Sym, bind, hint, new_atom, set_arg, size_product


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


def _freeze_chunk(alg, chunk_in: list, chunk_out: list, out: list, reason: str) -> None:
    """Inputs and fresh outputs of a chunk the algebra cannot follow are all frozen."""
    for a, _ in chunk_in:
        alg.freeze(a, reason)
    for pos, d in chunk_out:
        out[pos] = new_atom(alg, d)
        alg.freeze(out[pos], reason)


def _reshape_chunk(ctx: OpContext, chunk_in: list, chunk_out: list, out: list) -> None:
    alg = ctx.alg
    if not _equal_size(size_product([d for _, d in chunk_in]), size_product([d for _, d in chunk_out])):
        _freeze_chunk(alg, chunk_in, chunk_out, out, "reshape sizes could not be matched")
        return
    if len(chunk_in) == 1 and len(chunk_out) == 1:
        out[chunk_out[0][0]] = chunk_in[0][0]
        return
    if any(isinstance(d, Sym) for _, d in chunk_in + chunk_out):
        if not _dynamic_chunk(ctx, chunk_in, chunk_out, out):
            _freeze_chunk(alg, chunk_in, chunk_out, out, "reshaped together with a dynamic dimension")
        return
    for (pos, _), atom in zip(chunk_out, _static_view(alg, [a for a, _ in chunk_in], [d for _, d in chunk_out])):
        out[pos] = atom


def _static_view(alg, in_atoms: list[int], out_sizes: list[int]) -> list[int]:
    """Atoms of static sizes `out_sizes` viewing the row-major product of `in_atoms`."""
    if not in_atoms and not out_sizes:
        return []
    if len(in_atoms) == 1:
        source = in_atoms[0]
    else:  # many inputs: an axis that is the product of them
        source = alg.new(math.prod(alg.size(a) for a in in_atoms))
        for child, a in zip(alg.refine(source, PRODUCT, [alg.size(a) for a in in_atoms]), in_atoms):
            alg.unify(child, a)
    if len(out_sizes) == 1:
        return [source]
    return alg.refine(source, PRODUCT, out_sizes)


def _coefficient(d: Any) -> tuple[int, Any]:
    """(static coefficient, symbolic rest) of a size: 4*s0 -> (4, s0); 16 -> (16, None)."""
    if not isinstance(d, Sym):
        return int(d), None
    coeff, rest = d.expr.as_coeff_Mul()
    if not coeff.is_Integer or int(coeff) < 1:
        return 1, d.expr
    return int(coeff), rest


def _factors(alg, atom: int, d: Any) -> list[tuple[int, bool]] | None:
    """The row-major factors of an input axis as (atom, is_dynamic); None when their order is unknown.

    A dynamic axis is one dynamic factor, or a product whose refinement says
    where its single dynamic factor sits (batch x heads made by an earlier view).
    """
    coeff, rest = _coefficient(d)
    if rest is None:
        return [(atom, False)]
    if coeff == 1:
        return [(atom, True)]
    ref = alg.refinement(atom)
    if ref is None or ref.kind != PRODUCT:
        return None
    leaves = [(c, alg.symbolic(c) is not None) for c in ref.children]
    return leaves if sum(dyn for _, dyn in leaves) == 1 else None


def _dynamic_chunk(ctx: OpContext, chunk_in: list, chunk_out: list, out: list) -> bool:
    """A view that folds static axes into a dynamic one, or unfolds them (batch x heads).

    ``[B, L, 768] -> [B*12, L, 64]`` (BLOOM, nn.MultiheadAttention): the
    dynamic factors of the chunk form one run on each side (``B``; or ``L, B``
    folded into ``L*B``); the static factors before and after the run are
    views of each other (the static algebra), and an output axis ``a*B*b``
    becomes a product ``[a, B, b]`` whose static factors can be cut. Returns
    False (the caller freezes) for anything else: dynamic factors apart from
    each other, or a dynamic axis whose internal order is unknown.
    """
    alg = ctx.alg
    ins: list[tuple[int, bool]] = []
    for a, d in chunk_in:
        factors = _factors(alg, a, d)
        if factors is None:
            return False
        ins.extend(factors)
    dynamic = [k for k, (_, dyn) in enumerate(ins) if dyn]
    sym_at = [i for i, (_, d) in enumerate(chunk_out) if isinstance(d, Sym)]
    if not dynamic or not _contiguous(dynamic) or not sym_at or not _contiguous(sym_at):
        return False
    k0, k1 = dynamic[0], dynamic[-1] + 1
    run = [a for a, _ in ins[k0:k1]]
    run_sym = _product_sym([alg.symbolic(a) for a in run])
    coeffs = [_coefficient(chunk_out[i][1]) for i in sym_at]
    if len(sym_at) > 1 and any(c != 1 for c, _ in coeffs):
        return False
    if _product_sym([Sym(rest, 1) for _, rest in coeffs]) != run_sym:
        return False
    before = math.prod(alg.size(a) for a, _ in ins[:k0])
    out_before = math.prod(d for _, d in chunk_out[:sym_at[0]])
    coeff = coeffs[0][0] if len(sym_at) == 1 else 1
    if before % out_before or coeff % (before // out_before):
        return False
    major = before // out_before  # static factors of the dynamic output axis before and after its dynamic run
    minor = coeff // major
    head_sizes = [d for _, d in chunk_out[:sym_at[0]]] + ([major] if major > 1 else [])
    tail_sizes = ([minor] if minor > 1 else []) + [d for _, d in chunk_out[sym_at[-1] + 1:]]
    tail_in = [a for a, _ in ins[k1:]]
    if math.prod(head_sizes) != before or math.prod(tail_sizes) != math.prod(alg.size(a) for a in tail_in):
        return False
    head = _static_view(alg, [a for a, _ in ins[:k0]], head_sizes)
    tail = _static_view(alg, tail_in, tail_sizes)
    for (pos, _), atom in zip(chunk_out[:sym_at[0]], head):
        out[pos] = atom
    for (pos, _), atom in zip(chunk_out[sym_at[-1] + 1:], tail[1 if minor > 1 else 0:]):
        out[pos] = atom
    if len(sym_at) > 1 or (len(run) > 1 and major == minor == 1):  # dynamic axes regrouped: new dynamic atoms
        for i in sym_at:
            out[chunk_out[i][0]] = new_atom(alg, chunk_out[i][1])
        return True
    source = run[0] if len(run) == 1 else new_atom(alg, run_sym)
    parts = ([head[-1]] if major > 1 else []) + [source] + ([tail[0]] if minor > 1 else [])
    pos, sym = chunk_out[sym_at[0]]
    if len(parts) == 1:
        out[pos] = source
        return True
    folded = alg.new(hint(sym), symbolic=sym)  # not frozen itself: its static factors may be cut
    for child, atom in zip(alg.refine(folded, PRODUCT, [alg.size(p) for p in parts]), parts):
        alg.unify(child, atom)
    out[pos] = folded
    return True


def _contiguous(positions: list[int]) -> bool:
    return positions == list(range(positions[0], positions[-1] + 1))


def _product_sym(syms: list[Sym]) -> Sym:
    expr, value = 1, 1
    for s in syms:
        expr, value = expr * s.expr, value * s.hint
    return Sym(expr, value)


def _rewrite_size_list(arg_name: str, out_axes: list[int], offset: int = 0,
                       out_dims: list[Any] | None = None) -> Rewriter:
    """Rewriter for a list argument whose static entries are the output's sizes.

    A dynamic entry ``c*B`` (a size node: batch x heads folded into one axis)
    whose static factors shrink to ``c'`` becomes ``c*B // c * c'`` (`out_dims`
    gives the captured sizes, hence ``c`` and ``B``'s example value).
    """

    def rewrite(node: fx.Node, new_size: Callable[[int], int]) -> None:
        sizes = bind(node)[arg_name]
        new = []
        for k, s in enumerate(sizes):
            atom = out_axes[offset + k] if offset + k < len(out_axes) else None
            if isinstance(s, fx.Node) and out_dims is not None and atom is not None:
                new.append(_rescale_dynamic(node, s, out_dims[offset + k], new_size(atom)))
                continue
            keep = not isinstance(s, int) or s == -1 or s == 1
            new.append(s if keep else new_size(atom))
        set_arg(node, arg_name, new)

    return rewrite


def _rescale_dynamic(node: fx.Node, size: fx.Node, captured: Any, kept: int) -> Any:
    """A size node for a dynamic axis whose static coefficient follows the subnet's (kept = its new size at the
    example input's value of the dynamic factor)."""
    if not isinstance(captured, Sym):
        return size
    coeff, rest = _coefficient(captured)
    if rest is None or coeff == 1:
        return size
    dynamic = captured.hint // coeff
    new_coeff = kept // dynamic
    if new_coeff == coeff:
        return size
    with node.graph.inserting_before(node):
        base = node.graph.call_function(operator.floordiv, (size, coeff))
        return node.graph.call_function(operator.mul, (base, new_coeff))


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------
