"""Training and evaluation mode for graphs captured in training mode.

torch.export captures a model as it trains: dropout with ``train=True``,
attention with its dropout probability, batch norm on batch statistics with
a running-statistics update, the ``num_batches_tracked`` increment. :func:`follow_training_flag` rewrites
those ops to read the ``training`` flag of the module they came from at run
time, so ``subnet.eval()`` means what ``model.eval()`` means. Python-level
``if self.training:`` branches were resolved during capture and cannot be
rewritten; :func:`eval_mismatch` finds them by running the rewritten graph
and the user's model in evaluation mode on the example inputs, and subnets
of such a model refuse evaluation mode (:func:`refuse_eval`) instead of
silently running the training branch.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from istfx.errors import ISTError

aten = torch.ops.aten

# op -> index of its training flag; the flag is rewritten only where capture recorded a literal True.
_TRAIN_FLAG = {
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.native_dropout.default: 2,
    aten.rrelu.default: 3,
}
# Norms whose flag only matters with running statistics (args[3] is the running mean).
_STATS_FLAG = {aten.batch_norm.default: 5, aten.instance_norm.default: 5}


def follow_training_flag(gm: fx.GraphModule) -> bool:
    """Make mode-dependent ops of `gm` (and its nested graphs) follow their module's ``training`` flag.

    Returns True when `gm` or a nested graph changed (the caller recompiles).
    """
    changed = False
    for sub in gm.modules():
        if isinstance(sub, fx.GraphModule):
            changed |= _rewrite(sub, top=sub is gm)
    return changed


def _rewrite(gm: fx.GraphModule, top: bool) -> bool:
    flags: dict[str, fx.Node] = {}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        index = _TRAIN_FLAG.get(node.target)
        if index is None and node.target in _STATS_FLAG and len(node.args) > 3 and node.args[3] is not None:
            index = _STATS_FLAG[node.target]
        if index is not None and len(node.args) > index and node.args[index] is True:
            node.update_arg(index, _flag(gm, node, flags, top))
            changed = True
        elif node.target is aten.scaled_dot_product_attention.default and _attention_dropout(node):
            # Attention code passes ``dropout_p=p if self.training else 0.0``: keep p only while training.
            p = _attention_dropout(node)
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(operator.mul, (_flag(gm, node, flags, top), p))
            if len(node.args) > 4:
                node.update_arg(4, scaled)
            else:
                node.update_kwarg("dropout_p", scaled)
            changed = True
        elif (node.target is aten.add_.Tensor and isinstance(node.args[0], fx.Node)
              and node.args[0].op == "get_attr" and str(node.args[0].target).endswith("num_batches_tracked")
              and node.args[1] == 1):
            node.update_arg(1, _flag(gm, node, flags, top))  # BatchNorm counts training batches only
            changed = True
    return changed


def _attention_dropout(node: fx.Node) -> float:
    p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    return p if isinstance(p, float) and p > 0 else 0.0


def _flag(gm: fx.GraphModule, node: fx.Node, flags: dict[str, fx.Node], top: bool) -> fx.Node:
    """A node reading ``training`` of the module `node` came from (its nearest ancestor held by `gm`)."""
    path = ""
    stack = node.meta.get("nn_module_stack") or {}
    if top and stack:
        parts = str(list(stack.values())[-1][0]).split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            try:
                gm.get_submodule(candidate)
            except AttributeError:
                continue
            path = candidate
            break
    if path not in flags:
        first = next(iter(gm.graph.nodes))
        with gm.graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fx expects tensors or modules; a bool reads fine
            flags[path] = gm.graph.get_attr(f"{path}.training" if path else "training")
    return flags[path]


def refuse_eval(training: bool, reason: str) -> None:
    """Raise in evaluation mode: the captured graph cannot reproduce the model's evaluation branch."""
    if not training:
        raise ISTError(
            f"this subnet cannot run in evaluation mode: {reason}. Its graph was captured in training mode "
            "and the model's Python code takes another path when not training. Evaluate the reassembled "
            "model (ist.model.eval()) instead, or keep the subnet in training mode."
        )


def add_eval_refusal(gm: fx.GraphModule, reason: str) -> None:
    """Insert a :func:`refuse_eval` check at the start of `gm`'s graph (caller recompiles)."""
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flag = gm.graph.get_attr("training")
        gm.graph.call_function(refuse_eval, (flag, reason))


def eval_mismatch(model: nn.Module, base: fx.GraphModule, args: tuple, kwargs: dict) -> str | None:
    """Why the rewritten graph differs from `model` in evaluation mode on the inputs, or None.

    Runs both under ``no_grad`` on copies of the buffers, so neither the
    user's parameters nor buffers change. Outputs (structure and values) and
    buffers after the call are compared (structure and shapes only for a
    model on the meta device).
    """
    params = {id(p) for p in base.parameters()}
    memo: dict[int, Any] = {id(t): t for t in base.parameters()}
    memo.update({id(b): b.detach().clone() for b in base.buffers() if id(b) not in params})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(base, memo)
    if follow_training_flag(graph):
        for sub in graph.modules():
            if isinstance(sub, fx.GraphModule):
                sub.recompile()
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        graph.eval()
        with torch.no_grad():
            expected = model(*args, **kwargs)
            got = graph(*args, **kwargs)
        after = {name: b.detach().clone() for name, b in model.named_buffers()}
    except Exception as exc:  # e.g. an input check; the model's own errors surfaced in capture already
        return f"evaluation mode could not be checked ({type(exc).__name__}: {str(exc).strip()[:200]})"
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
        for m, mode in was_training.items():
            m.training = mode
    reason = _compare(expected, got)
    if reason:
        return reason
    graph_buffers = dict(graph.named_buffers())
    for name, value in after.items():
        mine = graph_buffers.get(name)
        if mine is not None and mine.shape == value.shape and not value.is_meta and not torch.equal(mine, value):
            return f"buffer {name} changes differently in evaluation mode"
    return None


def _compare(expected: Any, got: Any) -> str | None:
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if len(exp_leaves) != len(got_leaves):
        return "the output structure differs in evaluation mode"
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if isinstance(e, torch.Tensor) != isinstance(g, torch.Tensor):
            return f"output {i} differs in evaluation mode"
        if not isinstance(e, torch.Tensor):
            continue
        if e.shape != g.shape or e.dtype != g.dtype:
            return f"output {i} has another shape or dtype in evaluation mode"
        if e.is_meta or g.is_meta:
            continue  # captured on the meta device (istfx train --init-from): no values to compare
        if not e.is_floating_point():
            if not torch.equal(e, g):
                return f"output {i} differs in evaluation mode"
            continue
        scale = max(1.0, float(e.detach().abs().max())) if e.numel() else 1.0
        if not torch.allclose(e, g, rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
            err = float((e - g).abs().max())
            return f"output {i} differs in evaluation mode (max abs error {err:.3g})"
    return None
