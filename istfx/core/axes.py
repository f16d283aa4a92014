"""The axis algebra: every tensor axis in a captured graph is an *atom*.

Atoms that must be cut the same way are unified (union-find). An atom can be
*refined* into a sequence of child atoms, either as a product (a 768 axis
viewed as 12 heads x 64 head dims: index = head * 64 + dim) or as a
concatenation (GPT-2's fused 2304 axis split into q | k | v). Refinement is a
property of the whole class, so when two atoms are unified their refinements
are unified child by child, and when two views refine one axis differently the
algebra finds their common refinement (12x64 and 24x32 become 12x2x32) or
freezes the axis when none exists.

The leaves of this forest are the units the planner can cut. Each leaf class
carries flags: *frozen* (must not be cut: touches a model input/output, is
indexed by data, or met an op without a rule) and *approximate* (a cut gives a
valid narrower model that is not equal to masking, e.g. normalised over).

Example::

    >>> alg = AxisAlgebra()
    >>> hidden = alg.new(768)
    >>> heads, head_dim = alg.refine(hidden, PRODUCT, [12, 64])
    >>> alg.size(heads), alg.size(head_dim)
    (12, 64)
    >>> alg.refine(hidden, PRODUCT, [12, 64]) == [heads, head_dim]
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

PRODUCT = "product"
CONCAT = "concat"

# Frozen reasons that say an axis is not a set of units at all (a batch-like dynamic axis, the q/k/v
# selector of a packed projection), as opposed to units the rules could not follow.
DYNAMIC = "dynamic dimension (batch, sequence or nodes)"
SELECTED = "a single position is selected"
# The factor k of a concatenation of k equal pieces seen as a product [k, piece] (a channel shuffle).
PIECES = "which piece of a concatenation of equal pieces"
NOT_UNITS = (DYNAMIC, SELECTED, PIECES)
# A convolution's kernel window and spatial output (the roles pass tells conv channels and spatial positions by them).
KERNEL_WINDOW = "convolution kernel window"
SPATIAL = "spatial size follows the input"


@dataclass
class Refinement:
    """How an atom is cut into children: a PRODUCT (mixed radix) or a CONCAT (segments)."""
    kind: str  # PRODUCT or CONCAT
    children: list[int]


@dataclass
class Flags:
    """Why an atom may not be cut (frozen) or cuts only approximately."""
    frozen: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)

    def merge(self, other: "Flags") -> None:
        """Add the other atom's reasons to these (on unification)."""
        for reason in other.frozen:
            if reason not in self.frozen:
                self.frozen.append(reason)
        for reason in other.approximate:
            if reason not in self.approximate:
                self.approximate.append(reason)


class AxisAlgebra:
    """Union-find over axis atoms with product/concat refinement."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._refinement: dict[int, Refinement] = {}
        self._flags: dict[int, Flags] = {}
        self._symbolic: dict[int, object] = {}  # root -> dynamic size (see rules.Sym)

    # -- atoms -------------------------------------------------------------
    def new(self, size: int, frozen: str | None = None, symbolic: object = None) -> int:
        """A fresh atom of `size` (frozen with `frozen` as reason when given)."""
        atom = len(self._parent)
        self._parent.append(atom)
        self._size.append(int(size))
        self._flags[atom] = Flags()
        if symbolic is not None:
            self._symbolic[atom] = symbolic
        if frozen:
            self.freeze(atom, frozen)
        return atom

    def symbolic(self, atom: int) -> object:
        """The dynamic size of an atom (batch, sequence...), or None when static."""
        return self._symbolic.get(self.find(atom))

    def find(self, atom: int) -> int:
        """The representative atom of `atom`'s class."""
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:  # path compression
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def size(self, atom: int) -> int:
        """Number of elements along the atom."""
        return self._size[self.find(atom)]

    def refinement(self, atom: int) -> Refinement | None:
        """The class's refinement into children, or None for a leaf."""
        ref = self._refinement.get(self.find(atom))
        if ref is None:
            return None
        ref.children = [self.find(c) for c in ref.children]
        return ref

    def flags(self, atom: int) -> Flags:
        """The class's frozen/approximate reasons."""
        return self._flags[self.find(atom)]

    def freeze(self, atom: int, reason: str) -> None:
        """Mark the class as not cuttable, with a reason."""
        flags = self.flags(atom)
        if reason not in flags.frozen:
            flags.frozen.append(reason)

    def mark_approximate(self, atom: int, reason: str) -> None:
        """Mark the class as cuttable only approximately, with a reason."""
        flags = self.flags(atom)
        if reason not in flags.approximate:
            flags.approximate.append(reason)

    # -- unification ---------------------------------------------------------
    def unify(self, a: int, b: int) -> int:
        """Declare two atoms the same axis. Returns the surviving root."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self._size[ra] != self._size[rb]:
            raise ValueError(f"cannot unify axes of sizes {self._size[ra]} and {self._size[rb]}")
        ref_a, ref_b = self._refinement.pop(ra, None), self._refinement.pop(rb, None)
        self._parent[rb] = ra
        self._flags[ra].merge(self._flags.pop(rb))
        if rb in self._symbolic:
            self._symbolic.setdefault(ra, self._symbolic.pop(rb))
        if ref_a is None and ref_b is None:
            return ra
        if ref_a is None or ref_b is None:
            self._refinement[ra] = ref_a or ref_b
            return ra
        self._refinement[ra] = ref_a
        if ref_a.kind == ref_b.kind and [self.size(c) for c in ref_a.children] == [
            self.size(c) for c in ref_b.children
        ]:
            for ca, cb in zip(list(ref_a.children), list(ref_b.children)):
                self.unify(ca, cb)
        else:
            # Two different factorisations of one axis: express b's through a's.
            sizes = [self.size(c) for c in ref_b.children]
            for child, same in zip(ref_b.children, self.refine(ra, ref_b.kind, sizes)):
                self.unify(child, same)
        return self.find(ra)

    # -- refinement ----------------------------------------------------------
    def refine(self, atom: int, kind: str, sizes: Sequence[int]) -> list[int]:
        """Atoms for `sizes`, a factorisation (PRODUCT) or partition (CONCAT) of `atom`.

        Reuses an existing refinement, refines it further, or creates one. When
        the requested refinement is incompatible with the existing one, the
        atom is frozen and fresh frozen atoms are returned: values that flow
        from a frozen axis must never be cut.
        """
        sizes = [int(s) for s in sizes]
        total = math.prod(sizes) if kind == PRODUCT else sum(sizes)
        root = self.find(atom)
        if total != self._size[root]:
            raise ValueError(f"{kind} of {sizes} does not make an axis of size {self._size[root]}")
        if len(sizes) == 1:
            return [root]
        if kind == PRODUCT and 1 in sizes:
            # Size-1 factors carry no units: refine by the rest, and give the 1s fresh atoms.
            rest = self.refine(root, PRODUCT, [s for s in sizes if s != 1]) if total > 1 else []
            it = iter(rest)
            return [self.new(1) if s == 1 else next(it) for s in sizes]
        if kind == CONCAT and 0 in sizes:
            rest = iter(self.refine(root, CONCAT, [s for s in sizes if s != 0]))
            return [self.new(0) if s == 0 else next(rest) for s in sizes]
        existing = self.refinement(root)
        if existing is None:
            children = [self.new(s) for s in sizes]
            self._refinement[root] = Refinement(kind, children)
            return children
        if existing.kind != kind and self._equal_pieces(existing, kind, sizes):
            return self._pieces_as_product(root, kind, sizes)
        if existing.kind != kind:
            reason = _mixed_reason(total, existing.kind, [self.size(c) for c in existing.children], kind, sizes)
            self.freeze(root, reason)
            return [self.new(s, frozen=reason) for s in sizes]
        if [self.size(c) for c in existing.children] == sizes:
            return list(existing.children)
        return self._common_refinement(root, kind, sizes)

    def _equal_pieces(self, existing: Refinement, kind: str, sizes: list[int]) -> bool:
        """True when the concatenation side (existing or requested) has k >= 2 pieces of one size."""
        pieces = [self.size(c) for c in existing.children] if existing.kind == CONCAT else sizes
        return len(pieces) >= 2 and len(set(pieces)) == 1

    def _pieces_as_product(self, root: int, kind: str, sizes: list[int]) -> list[int]:
        """An axis that is both k equal pieces ``[p | p | ...]`` and a product: the pieces are the product
        ``[k, p]`` whose major factor says which piece (frozen: a cut would drop a whole input of the
        concatenation) and whose minor factor is every piece at once (their units are cut alike).

        ShuffleNet's channel shuffle views ``cat(x1, branch(x2))`` as ``[2, C/2]`` and transposes it; the
        next unit's ``chunk(2)`` takes halves of the shuffled ``[C/2, 2]``. Cutting unit i of each piece
        together keeps the shuffle a permutation of the held channels, so the cut is exact; each such
        halving refines the piece further (C/2 = 2 x C/4), and the algebra follows it as a common
        refinement of products.
        """
        existing = self.refinement(root)
        if existing.kind == CONCAT:  # becomes the product [k, p]; then the requested product refines it
            children = list(existing.children)
            piece = children[0]
            for child in children[1:]:
                piece = self.unify(piece, child)
            selector = self.new(len(children), frozen=PIECES)
            self._refinement[self.find(root)] = Refinement(PRODUCT, [selector, self.find(piece)])
            return self.refine(root, PRODUCT, sizes)
        k, p = len(sizes), sizes[0]
        selector, piece = self.refine(root, PRODUCT, [k, p])
        self.freeze(selector, PIECES)
        return [piece] * k

    def _common_refinement(self, root: int, kind: str, sizes: list[int]) -> list[int]:
        leaves = self._leaves_of_kind(root, kind)
        have = _boundaries(kind, [self.size(a) for a in leaves])
        want = _boundaries(kind, sizes)
        merged = sorted(set(have) | set(want), reverse=(kind == PRODUCT))
        if kind == PRODUCT and any(hi % lo for hi, lo in zip(merged, merged[1:])):
            reason = f"views {[self.size(a) for a in leaves]} and {sizes} share no common factorisation"
            self.freeze(root, reason)
            return [self.new(s, frozen=reason) for s in sizes]
        # Cut every leaf at the merged boundaries that fall inside it.
        pieces: list[tuple[int, int, int]] = []  # (start, end, atom) in boundary coordinates
        for leaf, (start, end) in zip(leaves, zip(have, have[1:])):
            inner = [b for b in merged if _strictly_between(kind, start, b, end)]
            cuts = [start, *inner, end]
            parts = self.refine(leaf, kind, [_span(kind, s, e) for s, e in zip(cuts, cuts[1:])])
            pieces.extend((s, e, p) for (s, e), p in zip(zip(cuts, cuts[1:]), parts))
        result = []
        for start, end in zip(want, want[1:]):
            inside = [p for s, e, p in pieces if _within(kind, start, s, e, end)]
            if len(inside) == 1:
                result.append(inside[0])
            else:
                composite = self.new(_span(kind, start, end))
                self._refinement[composite] = Refinement(kind, inside)
                result.append(composite)
        return result

    def _leaves_of_kind(self, atom: int, kind: str) -> list[int]:
        ref = self.refinement(atom)
        if ref is None or ref.kind != kind:
            return [self.find(atom)]
        return [leaf for child in ref.children for leaf in self._leaves_of_kind(child, kind)]

    # -- queries after analysis ------------------------------------------------
    def leaves(self, atom: int) -> list[int]:
        """All leaf classes under an atom (its units are cut through these)."""
        ref = self.refinement(atom)
        if ref is None:
            return [self.find(atom)]
        return [leaf for child in ref.children for leaf in self.leaves(child)]

    def propagate_flags(self) -> None:
        """Push frozen/approximate flags from refined atoms down to their leaves."""
        order = self._topological_refined_roots()
        changed = True
        while changed:  # an atom can be a factor of several parents (the pieces of a shuffled concatenation)
            changed = False
            for root in order:
                ref = self._refinement[root]
                for child in ref.children:
                    flags = self.flags(child)
                    before = (len(flags.frozen), len(flags.approximate))
                    flags.merge(self._flags[root])
                    changed |= before != (len(flags.frozen), len(flags.approximate))

    def _topological_refined_roots(self) -> list[int]:
        roots = [r for r in list(self._refinement) if self.find(r) == r]
        seen: set[int] = set()
        order: list[int] = []

        def visit(r: int) -> None:
            if r in seen:
                return
            seen.add(r)
            order.append(r)
            for c in self.refinement(r).children:
                if self.find(c) in self._refinement:
                    visit(self.find(c))

        # Parents before children: visit from roots that are nobody's child.
        children = {self.find(c) for r in roots for c in self._refinement[r].children}
        for r in roots:
            if r not in children:
                visit(r)
        for r in roots:
            visit(r)
        return order

    def new_size(self, atom: int, kept: Callable[[int], int]) -> int:
        """Size of an atom once each leaf class keeps `kept(leaf)` units."""
        ref = self.refinement(atom)
        if ref is None:
            return kept(self.find(atom))
        sizes = [self.new_size(c, kept) for c in ref.children]
        return math.prod(sizes) if ref.kind == PRODUCT else sum(sizes)

    def indices(self, atom: int, selected: Callable[[int], torch.Tensor | None]) -> torch.Tensor | None:
        """Positions along `atom` that survive; None when nothing is cut.

        `selected(leaf)` gives the kept positions of a leaf class (sorted
        LongTensor) or None to keep all of it.
        """
        ref = self.refinement(atom)
        if ref is None:
            return selected(self.find(atom))
        parts = [self.indices(c, selected) for c in ref.children]
        if all(p is None for p in parts):
            return None
        full = [torch.arange(self.size(c)) if p is None else p for c, p in zip(ref.children, parts)]
        if ref.kind == CONCAT:
            offsets = _boundaries(CONCAT, [self.size(c) for c in ref.children])
            return torch.cat([p + off for p, off in zip(full, offsets)])
        index = torch.zeros(1, dtype=torch.long)
        for child, p in zip(ref.children, full):
            index = (index[:, None] * self.size(child) + p[None, :]).reshape(-1)
        return index

    def roots(self) -> Iterable[int]:
        """Every class representative."""
        return (a for a in range(len(self._parent)) if self._parent[a] == a)


def _mixed_reason(total: int, kind_a: str, sizes_a: list[int], kind_b: str, sizes_b: list[int]) -> str:
    """Why an axis that is both a concatenation and a product is frozen.

    A channel shuffle of concatenated branches (ShuffleNetV2) views ``cat(x1, x2)``
    as ``[groups, C/groups]`` and transposes it: the pieces are interleaved. An
    exact cut would have to keep unit i of every piece together, and each later
    block halves the units that stay whole (116 channels: 58, 29, then none);
    the algebra does not follow that and freezes the axis instead.
    """
    return (f"axis of size {total} is both a {kind_a} {sizes_a} and a {kind_b} {sizes_b}: its pieces are "
            "interleaved (e.g. a channel shuffle of concatenated branches), a cut would have to pair their units")


def _boundaries(kind: str, sizes: Sequence[int]) -> list[int]:
    """Concat: prefix offsets [0, s0, s0+s1, ...]; product: suffix strides [N, ..., 1]."""
    if kind == CONCAT:
        out = [0]
        for s in sizes:
            out.append(out[-1] + s)
        return out
    out = [1]
    for s in reversed(sizes):
        out.append(out[-1] * s)
    return out[::-1]


def _span(kind: str, start: int, end: int) -> int:
    return end - start if kind == CONCAT else start // end


def _strictly_between(kind: str, start: int, b: int, end: int) -> bool:
    return start < b < end if kind == CONCAT else start > b > end


def _within(kind: str, outer_start: int, s: int, e: int, outer_end: int) -> bool:
    if kind == CONCAT:
        return outer_start <= s and e <= outer_end
    return outer_start >= s and e >= outer_end
