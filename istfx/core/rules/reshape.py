"""The reshape algebra: how a view regroups axes, and how its size constants follow."""
from __future__ import annotations

import math
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
        _freeze_chunk(alg, chunk_in, chunk_out, out, "reshaped together with a dynamic dimension")
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
