"""Axis analysis: run the rule table over a captured graph.

:class:`AxisAnalysis` walks the unlifted ``GraphModule`` of an exported
program once, in topological order, giving every tensor axis an atom of an
:class:`~istfx.core.axes.AxisAlgebra` and applying each node's rule. Model inputs
and outputs are frozen (their sizes are the user's contract); ops without a
rule freeze their axes and are reported with the model's source line.
Higher-order ops that wrap a subgraph (``torch.no_grad`` regions, autocast)
are analysed through their subgraph.

Usage::

    gm = torch.export.export(model, (x,), strict=False).module()
    result = AxisAnalysis(gm).run()
    result.state["fc1.weight"].axes   # atoms of each dimension
    result.diagnostics                # ops that froze axes, with source lines
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from istfx.core.axes import AxisAlgebra
from istfx.core.rules import OpContext, Rewriter, bind, dims, lookup, new_atom, op_name, rule_unknown


@dataclass(frozen=True)
class Diagnostic:
    """An op the analysis could not prove anything about; its axes were frozen."""

    op: str
    node: str
    source: str
    message: str

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.op} ({self.node}){where}: {self.message}"


@dataclass
class StateTensor:
    """A parameter, buffer or constant the graph reads, with one atom per dimension."""

    name: str
    kind: str  # "parameter" | "buffer" | "constant"
    shape: tuple[int, ...]
    axes: list[int]


@dataclass
class AnalysisResult:
    """What the analysis found: the algebra, state tensors, shape-constant rewriters, diagnostics."""
    alg: AxisAlgebra
    state: dict[str, StateTensor]
    rewriters: dict[tuple[str, str], list[Rewriter]]
    diagnostics: list[Diagnostic]
    node_axes: dict[tuple[str, str], Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> first name


_SUBGRAPH_OPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


class AxisAnalysis:
    """Infer coupled axes of every tensor in an unlifted exported GraphModule."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.alg = AxisAlgebra()
        self.state: dict[str, StateTensor] = {}
        self.rewriters: dict[tuple[str, str], list[Rewriter]] = {}
        self.diagnostics: list[Diagnostic] = []
        self.node_axes: dict[tuple[str, str], Any] = {}
        self._params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
        self._buffers = {n for n, _ in gm.named_buffers(remove_duplicate=False)}
        self._by_identity: dict[int, str] = {}  # tied weights: one tensor, several names
        self.aliases: dict[str, str] = {}
        self._constant_ops: list[tuple[fx.GraphModule, str, fx.Node]] = []  # ops a rule offered as constants

    def run(self) -> AnalysisResult:
        """Analyse the whole graph once and return the result."""
        self._run_graph(self.gm, "", inputs=None)
        self.alg.propagate_flags()
        self._store_constants()
        return AnalysisResult(self.alg, self.state, self.rewriters, self.diagnostics, self.node_axes,
                              self.aliases)

    # ------------------------------------------------------------------
    def _run_graph(self, gm: fx.GraphModule, path: str, inputs: list[Any] | None) -> Any:
        env: dict[fx.Node, Any] = {}
        placeholder_index = 0
        result = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if inputs is None:
                    env[node] = self._model_input(node)
                else:
                    env[node] = inputs[placeholder_index]
                placeholder_index += 1
            elif node.op == "get_attr":
                env[node] = self._state(path + node.target, gm, node) if node.users else None
            elif node.op == "call_function":
                env[node] = self._call(gm, path, node, env)
            elif node.op == "call_module":
                env[node] = None  # export's input guards: no tensors out
            elif node.op == "output":
                result = [_lookup(env, a) for a in _flatten(node.args[0])]
                if inputs is None:
                    for axes in result:
                        for atom in _atoms(axes):
                            self.alg.freeze(atom, "model output")
            self.node_axes[(path, node.name)] = env.get(node)
        return result

    def _model_input(self, node: fx.Node) -> Any:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        atoms = [new_atom(self.alg, d) for d in dims(val)]
        for a in atoms:
            self.alg.freeze(a, "model input")
        return atoms

    def _state(self, name: str, gm: fx.GraphModule, node: fx.Node) -> Any:
        value = get_attr_path(gm, node.target)
        if not isinstance(value, torch.Tensor):
            return None  # a subgraph module
        if name in self.state:
            return self.state[name].axes
        first = self._by_identity.setdefault(id(value), name)
        if first != name:  # a tied weight read under a second name: the same axes
            self.aliases[name] = first
            return self.state[first].axes
        kind = "parameter" if name in self._params else "buffer" if name in self._buffers else "constant"
        axes = [self.alg.new(s) for s in value.shape]
        if kind == "constant":
            for a in axes:
                self.alg.freeze(a, "tensor constant inside the graph")
        self.state[name] = StateTensor(name, kind, tuple(value.shape), axes)
        return axes

    def _call(self, gm: fx.GraphModule, path: str, node: fx.Node, env: dict) -> Any:
        name = op_name(node)
        if name.startswith("higher_order.") and name.split(".", 1)[1] in _SUBGRAPH_OPS:
            return self._call_subgraph(gm, path, node, env)
        ctx = OpContext(self.alg, node, bind(node), lambda v: _lookup(env, v))
        if _dead(node):
            return None  # nothing reads it: what it would say about axes constrains nothing
        rule = lookup(node)
        if rule is None:
            rule_unknown(ctx)
            self._report(node, "no axis rule for this op; its axes are frozen")
        else:
            try:
                rule(ctx)
            except Exception as exc:  # a rule that cannot follow this call must not guess
                ctx = OpContext(self.alg, node, bind(node), lambda v: _lookup(env, v))
                rule_unknown(ctx, why="axis rule failed")
                self._report(node, f"axis rule failed ({type(exc).__name__}: {exc}); its axes are frozen")
        if ctx.rewriters:
            self.rewriters[(path, node.name)] = ctx.rewriters
        if ctx.constant:
            self._constant_ops.append((gm, path, node))
        return ctx.outputs

    def _store_constants(self) -> None:
        """Store each op a rule offered as a constant (:meth:`OpContext.as_constant`) whose axes can be cut.

        The op becomes a read of a graph constant holding its full output
        (``_to_copy`` keeps its dtype and device), recorded as state with the
        op's output axes, so every subnet reads the slice of the positions it
        holds. Ops whose axes are all frozen stay as they are.
        """
        for gm, path, node in self._constant_ops:
            axes = self.node_axes.get((path, node.name))
            if not axes or all(self.alg.flags(leaf).frozen for a in axes for leaf in self.alg.leaves(a)):
                continue
            kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "layout", "device", "pin_memory")}
            value = node.target(*node.args, **{**node.kwargs, "device": torch.device("cpu")})
            attr = f"_istfx_constant_{node.name}"
            setattr(gm, attr, value)
            with gm.graph.inserting_before(node), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # fx expects buffers; export's constants are plain
                read = gm.graph.get_attr(attr)
            read.meta["val"] = node.meta.get("val")
            node.target, node.args, node.kwargs = torch.ops.aten._to_copy.default, (read,), kwargs
            name = path + attr
            self.state[name] = StateTensor(name, "constant", tuple(value.shape), list(axes))
            gm.recompile()

    def _call_subgraph(self, gm: fx.GraphModule, path: str, node: fx.Node, env: dict) -> Any:
        args = list(node.args)
        sub_pos = next(i for i, a in enumerate(args) if isinstance(a, fx.Node) and a.op == "get_attr"
                       and isinstance(get_attr_path(gm, a.target), fx.GraphModule))
        sub_target = args[sub_pos].target
        operands = [_lookup(env, a) for a in args[sub_pos + 1:]]
        sub = get_attr_path(gm, sub_target)
        outputs = self._run_graph(sub, f"{path}{sub_target}.", inputs=operands)
        return outputs

    def _report(self, node: fx.Node, message: str) -> None:
        self.diagnostics.append(Diagnostic(op_name(node), node.name, source_line(node), message))


def source_line(node: fx.Node) -> str:
    """'file.py:12 `code`' of the user's line that produced a node, from export's stack trace.

    The innermost frame outside library internals (torch, transformers, ...)
    is the line the user wrote (``self.lstm(x)``); where the op itself comes
    from deeper inside a library, that frame follows as ``(in rnn.py:1164)``.
    """
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]+\n\s*([^\n]*)', trace)
    if not frames:
        return ""
    user = next((f for f in reversed(frames) if not _is_library(f[0])), frames[-1])
    file, line, code = user
    text = f"{file}:{line} `{code.strip()}`"
    if user is not frames[-1]:
        inner_file, inner_line, _ = frames[-1]
        text += f" (in {_short_library_path(inner_file)}:{inner_line})"
    return text


LIBRARIES = ("torch", "transformers", "torch_geometric", "accelerate", "timm")


@functools.lru_cache(maxsize=None)
def _library_dirs() -> tuple[str, ...]:
    """Install folders of the libraries whose frames are internals, not the user's code."""
    dirs = []
    for name in LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.realpath(location) + os.sep)
    return tuple(dirs)


@functools.lru_cache(maxsize=4096)
def _is_library(file: str) -> bool:
    return os.path.realpath(file).startswith(_library_dirs())


def _short_library_path(file: str) -> str:
    """'torch/nn/modules/rnn.py' from an installed file's full path."""
    real = os.path.realpath(file)
    for folder in _library_dirs():
        if real.startswith(folder):
            return os.path.join(os.path.basename(folder.rstrip(os.sep)), real[len(folder):])
    return file


def _dead(node: fx.Node) -> bool:
    """A pure op whose result nobody reads (``nn.MultiheadAttention``'s averaged attention weights when
    the caller drops them): export keeps it, but it is not part of what the model computes."""
    target = node.target
    return (not node.users and isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def get_attr_path(obj: Any, target: str) -> Any:
    """``obj.a.b.c`` for ``target == "a.b.c"``: a submodule, parameter or buffer by dotted name."""
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


def _lookup(env: dict, value: Any) -> Any:
    if isinstance(value, fx.Node):
        return env.get(value)
    return None


def _atoms(axes: Any) -> list[int]:
    if axes is None:
        return []
    if isinstance(axes, list) and axes and isinstance(axes[0], list):
        return [a for sub in axes for a in _atoms(sub)]
    return [a for a in axes if isinstance(a, int)]
