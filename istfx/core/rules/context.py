"""What a rule sees: :class:`OpContext`, sizes (:class:`Sym` for dynamic ones), argument binding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx

from ..axes import DYNAMIC, AxisAlgebra

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
    constant: bool = False  # the output may be stored as a constant and sliced with its axes

    # -- reading ---------------------------------------------------------------
    def arg(self, name: str, default: Any = None) -> Any:
        """A bound argument by schema name."""
        return self.bound.get(name, default)

    def axes(self, name_or_value: Any) -> list[int]:
        """Atoms of a tensor argument (by schema name or value)."""
        value = self.bound[name_or_value] if isinstance(name_or_value, str) else name_or_value
        axes = self.axes_of(value)
        if axes is None or (axes and isinstance(axes[0], list)):
            raise TypeError(f"{name_or_value!r} is not a tensor argument of {self.node.target}")
        return axes

    def is_tensor(self, value: Any) -> bool:
        """True when `value` is a tensor the analysis has axes for."""
        axes = self.axes_of(value)
        return axes is not None and not (axes and isinstance(axes[0], list))

    def dims_of(self, value: Any) -> list[Any]:
        """Sizes of a tensor argument."""
        return [self.dim(a) for a in self.axes(value)]

    def out_dims(self, index: int | None = None) -> list[Any]:
        """Sizes of the output (or of output `index` of a tuple)."""
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
        """New atoms for sizes that no input determines."""
        return [new_atom(self.alg, d) for d in dims_]

    def output(self, axes: Any) -> None:
        """Declare the output atoms (a list, or a list of lists for tuples)."""
        self.outputs = axes

    def same(self, a: int, b: int) -> None:
        """Declare two axes one axis (frozen if their sizes disagree)."""
        da, db = self.dim(a), self.dim(b)
        if da == db:
            self.alg.unify(a, b)
        else:
            reason = f"{op_name(self.node)} pairs axes of sizes {da} and {db}"
            self.alg.freeze(a, reason)
            self.alg.freeze(b, reason)

    def freeze(self, atom: int, why: str) -> None:
        """This axis must not be cut."""
        self.alg.freeze(atom, f"{why} ({op_name(self.node)})")

    def approximate(self, atom: int, why: str) -> None:
        """Cutting this axis gives a valid but not mask-equivalent model."""
        self.alg.mark_approximate(atom, f"{why} ({op_name(self.node)})")

    def as_constant(self) -> None:
        """This op's output depends on no input and no dynamic size (an ``arange(n)``): where one of its
        axes can be cut, the analysis stores the full output as a graph constant, and each subnet reads
        the slice of it that holds its units (the values at the positions it holds, which is exact)."""
        self.constant = True

    def rewrite(self, fn: Rewriter) -> None:
        """Register how this node's shape arguments follow shrunken axes."""
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
    """The example input's value of a size."""
    return d.hint if isinstance(d, Sym) else int(d)


def new_atom(alg: AxisAlgebra, d: Any) -> int:
    """An atom for a size; dynamic sizes are frozen.

    A dynamic size with a static coefficient (``4*s0``: batch x heads folded by
    a view) is not frozen itself: when it meets the view that made it, it takes
    that view's product refinement, whose dynamic factor is frozen and whose
    static factors may be cut. No parameter axis can be unified with it (sizes
    differ), so it is never cut on its own.
    """
    if isinstance(d, Sym):
        coeff, _ = d.expr.as_coeff_Mul()
        if coeff.is_Integer and int(coeff) > 1:
            return alg.new(d.hint, symbolic=d)
        return alg.new(d.hint, frozen=DYNAMIC, symbolic=d)
    return alg.new(d)


def op_name(node: fx.Node) -> str:
    """"namespace.name" of a node's op, for tables and messages."""
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


def _flat_values(bound: dict[str, Any]) -> list[Any]:
    out = []
    for v in bound.values():
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out
