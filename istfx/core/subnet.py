"""Subnet templates: the captured graph with shape constants rewritten for smaller axes.

A template depends only on how many units of each group a subnet holds, so
it is built once per size signature and reused every round; a round only
instantiates it with freshly sliced parameters (:meth:`SubnetTemplate.instantiate`),
a shallow copy of the module tree that shares the generated code.

Usage::

    template = SubnetTemplate(captured.module, analysis, new_size)
    subnet = template.instantiate({"fc1.weight": w_slice, ...})
    subnet(x)   # same call signature and output structure as the model
    subnet.eval()(x)   # dropout off, batch norm on running statistics, as model.eval()
"""
from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from istfx.core.analysis import AnalysisResult, get_attr_path
from istfx.core.capture import InputShapes
from istfx.core.modes import add_eval_refusal, follow_training_flag

if TYPE_CHECKING:
    from istfx.core.interfaces import Branch


class SubnetTemplate:
    """A copy of the unlifted graph module whose shape constants fit smaller axes."""

    def __init__(
        self,
        base: fx.GraphModule,
        analysis: AnalysisResult,
        new_size: Callable[[int], int],
        drop: Sequence[Branch] = (),
        scale: Sequence[tuple[Branch, float]] = (),
        eval_refusal: str | None = None,
    ) -> None:
        # Copy graph and code, not weights: state tensors become empty placeholders.
        memo = {id(t): torch.empty(0, dtype=t.dtype) for t in _state_tensors(base)}
        # Pytree specs are immutable: share them rather than copy.
        memo.update({id(v): v for v in base.__dict__.values() if isinstance(v, pytree.TreeSpec)})
        with warnings.catch_warnings():  # torch's own pytree deprecation notices while copying specs
            warnings.simplefilter("ignore", FutureWarning)
            module = copy.deepcopy(base, memo)
        _keep_input_checks(base, module)
        touched: set[int] = set()
        for (path, node_name), rewriters in analysis.rewriters.items():
            graph_module = module if not path else get_attr_path(module, path.rstrip("."))
            node = _node(graph_module, node_name)
            for rewrite in rewriters:
                rewrite(node, new_size)
            touched.add(id(graph_module))
        dropped = _drop_branches(module.graph, drop)
        _scale_branches(module.graph, scale)
        if drop or scale or _follow_input_device(module.graph):
            touched.add(id(module))
        # subnet.eval() switches dropout and batch norm as model.eval() does (or refuses, see core.modes).
        if follow_training_flag(module):
            touched.update(id(sub) for sub in module.modules() if isinstance(sub, fx.GraphModule))
        if eval_refusal:
            add_eval_refusal(module, eval_refusal)
            touched.add(id(module))
        for sub in module.modules():
            if isinstance(sub, fx.GraphModule) and id(sub) in touched:
                sub.recompile()
        self.module = module
        self.dropped = dropped
        self.used = (set(analysis.state) | set(analysis.aliases)) - dropped
        self.aliases = dict(analysis.aliases)
        # Which names are parameters: the template's copy registers parameters of the root
        # module as buffers (fx copies the placeholder tensors standing in for them).
        self.parameters = {n for n, t in analysis.state.items() if t.kind == "parameter"}

    def instantiate(self, tensors: dict[str, torch.Tensor], requires_grad: dict[str, bool]) -> nn.Module:
        """A new module sharing the template's code, holding `tensors` as its state."""
        params: dict[str, nn.Parameter] = {}

        def value_for(fqn: str, is_param: bool):
            name = self.aliases.get(fqn, fqn)
            tensor = tensors[name]
            if not is_param:
                return tensor
            if name not in params:
                params[name] = nn.Parameter(tensor, requires_grad=requires_grad.get(name, True))
            return params[name]

        def is_param(fqn: str) -> bool:
            return self.aliases.get(fqn, fqn) in self.parameters

        def clone(mod: nn.Module, prefix: str) -> nn.Module:
            new = copy.copy(mod)
            state = [(k, v) for k, v in [*mod._parameters.items(), *mod._buffers.items()]
                     if v is not None and prefix + k in self.used]
            new._parameters = {k: value_for(prefix + k, True) for k, _ in state if is_param(prefix + k)}
            new._buffers = {k: value_for(prefix + k, False) for k, _ in state if not is_param(prefix + k)}
            new._non_persistent_buffers_set = mod._non_persistent_buffers_set - set(new._parameters)
            for k, v in list(mod._parameters.items()) + list(mod._buffers.items()):
                if v is not None and prefix + k not in self.used:
                    # Read by the generated code but unused (e.g. a tied weight's second name).
                    object.__setattr__(new, k, v.detach())
            new._modules = {k: clone(child, f"{prefix}{k}.") for k, child in mod._modules.items()}
            for k, v in list(mod.__dict__.items()):
                fqn = prefix + k
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and fqn in tensors:
                    object.__setattr__(new, k, tensors[fqn])  # graph constants
            return new

        subnet = clone(self.module, "")
        _keep_input_checks(self.module, subnet)
        return subnet


def _keep_input_checks(base: fx.GraphModule, module: fx.GraphModule) -> None:
    """Carry the input shape check (a forward pre-hook) that GraphModule's copies leave behind."""
    if any(isinstance(h, InputShapes) for h in module._forward_pre_hooks.values()):
        return
    for hook in base._forward_pre_hooks.values():
        if isinstance(hook, InputShapes):
            module.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)


def _drop_branches(graph: fx.Graph, branches: Sequence[Branch]) -> set[str]:
    """Replace each residual add by its skip input and erase the branch; returns dropped state names."""
    by_name = {n.name: n for n in graph.nodes}
    dropped: set[str] = set()
    for branch in branches:
        add, out = by_name[branch.add], by_name[branch.output]
        skip = next(a for a in add.args[:2] if a is not out)  # current: an earlier drop may have rewired it
        add.replace_all_uses_with(skip)
        graph.erase_node(add)
        for name in reversed(branch.nodes):
            graph.erase_node(by_name[name])
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and any(node.target in b.parameters for b in branches):
            dropped.add(node.target)
            graph.erase_node(node)
    return dropped


def _scale_branches(graph: fx.Graph, scaled: Sequence[tuple[Branch, float]]) -> None:
    """Multiply kept branch outputs by a factor (training-time depth scaling)."""
    by_name = {n.name: n for n in graph.nodes}
    for branch, factor in scaled:
        add, out = by_name[branch.add], by_name[branch.output]
        with graph.inserting_before(add):
            mul = graph.call_function(torch.ops.aten.mul.Tensor, (out, factor))
        add.replace_input_with(out, mul)


def _follow_input_device(graph: fx.Graph) -> bool:
    """Make factory ops (arange, zeros, ...) create tensors on the first tensor input's device.

    Export bakes the capture device into them; a model captured on the meta
    device (``istfx train`` builds ranks' models there) or on the CPU would
    otherwise create meta or CPU tensors wherever its subnets run.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"
                    and isinstance(n.meta.get("val"), torch.Tensor)]
    factories = [n for n in graph.nodes if n.op == "call_function"
                 and isinstance(n.kwargs.get("device"), torch.device)]
    if not placeholders or not factories:
        return False
    with graph.inserting_after(placeholders[-1]):
        device = graph.call_function(getattr, (placeholders[0], "device"))
    for node in factories:
        node.kwargs = {**node.kwargs, "device": device}
    return True


def _state_tensors(module: nn.Module):
    seen = set()
    for mod in module.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield t
        for v in mod.__dict__.values():
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                yield v


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"node {name} not found in the template graph")
