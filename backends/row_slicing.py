"""Blocks of a tensor selected by one index per dimension, gathered and scattered a few rows at a time.

The sharded topology moves pieces of slices between ranks: a *block* is
selected by ``index``, one entry per dimension (a 1-D index tensor, or None
for the whole dimension); a *masked* block keeps only the elements where a
boolean mask (broadcast to the block's shape) is set. Every helper works
through the block's rows in chunks of about :data:`CHUNK` elements, so the
temporaries of an exchange stay small whatever the tensor's size. ::

    block = take_block(weight, [rows, None])          # weight[rows, :]
    put_block(weight, [rows, None], block * 2)        # written back
    values = masked_take(weight, [rows, cols], mask, (len(rows), len(cols)))
    masked_put(weight, [rows, cols], mask, (len(rows), len(cols)), values)
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import torch

__all__ = ["CHUNK", "masked_put", "masked_take", "put_block", "select", "take_block"]

Index = Sequence["torch.Tensor | None"]

CHUNK = int(os.environ.get("ISTFX_EXCHANGE_CHUNK", 1 << 18))
"""Elements gathered or scattered at once (``ISTFX_EXCHANGE_CHUNK``): bounds the temporaries of the exchange."""


def _open_index(index: Index, shape: Sequence[int]) -> tuple:
    """Advanced-indexing tensors that select the block `index` (broadcast against each other)."""
    rank = len(index)
    out = []
    for dim, (i, size) in enumerate(zip(index, shape)):
        i = torch.arange(size, device=i.device if i is not None else None) if i is None else i
        view = [1] * rank
        view[dim] = -1
        out.append(i.view(view))
    return tuple(out)


def select(tensor: torch.Tensor, index: Index) -> torch.Tensor:
    """``tensor`` restricted to `index` (a new tensor, also when `index` selects everything)."""
    out = tensor
    for dim, i in enumerate(index):
        if i is not None:
            out = out.index_select(dim, i.to(out.device))
    return out if out is not tensor else tensor.clone()


def _row_chunks(rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK // max(1, row_elems))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def _rows_of(index: Index, a: int, b: int) -> list[torch.Tensor | None]:
    """`index` restricted to the block's rows ``a:b``."""
    first = index[0][a:b] if index[0] is not None else torch.arange(a, b)
    return [first, *index[1:]]


def take_block(base: torch.Tensor, index: Index) -> torch.Tensor:
    """``base`` restricted to `index` (per dimension, None = all), gathered a few rows at a time."""
    sizes = [base.shape[d] if i is None else len(i) for d, i in enumerate(index)]
    out = torch.empty(sizes, dtype=base.dtype, device=base.device)
    for a, b in _row_chunks(sizes[0], math.prod(sizes[1:])):
        out[a:b] = select(base, _rows_of(index, a, b))
    return out


def put_block(base: torch.Tensor, index: Index, value: torch.Tensor) -> None:
    """Write `value` into the block of `base` that `index` selects, a few rows at a time."""
    for a, b in _row_chunks(value.shape[0], math.prod(value.shape[1:])):
        rows = _rows_of(index, a, b)
        base[_open_index([None if i is None else i.to(base.device) for i in rows], base.shape)] = \
            value[a:b].to(base.dtype)


def _mask_rows(mask: torch.Tensor, a: int, b: int, shape: Sequence[int]) -> torch.Tensor:
    part = mask[a:b] if mask.shape[0] > 1 else mask
    return part.expand((b - a, *shape[1:]))


def masked_take(base: torch.Tensor, index: Index, mask: torch.Tensor, full: Sequence[int]) -> torch.Tensor:
    """The elements of block `index` of `base` where `mask` (broadcast to `full`) is set, row-major."""
    parts = []
    for a, b in _row_chunks(full[0], math.prod(full[1:])):
        sub = select(base, _rows_of(index, a, b))
        parts.append(sub.masked_select(_mask_rows(mask, a, b, full).to(sub.device)))
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def masked_put(base: torch.Tensor, index: Index, mask: torch.Tensor, full: Sequence[int],
               values: torch.Tensor) -> None:
    """Write `values` (row-major) into the elements of block `index` of `base` where `mask` is set."""
    offset = 0
    for a, b in _row_chunks(full[0], math.prod(full[1:])):
        rows = [None if i is None else i.to(base.device) for i in _rows_of(index, a, b)]
        sub = select(base, rows)
        keep = _mask_rows(mask, a, b, full).to(sub.device)
        count = int(keep.sum())
        if count:
            sub.masked_scatter_(keep, values[offset:offset + count].to(sub.dtype))
            base[_open_index(rows, base.shape)] = sub
        offset += count
