"""Capture: a model's graph through ``torch.export`` with every input dim dynamic.

Example inputs are taken, in order, from the caller, from a Hugging Face
model's ``dummy_inputs``, or inferred from the model's first layer
(Linear/Conv/Embedding). The graph is exported non-strict, in training mode
(so batch norm and dropout are captured as they train), and unlifted into a
``GraphModule`` whose parameters keep their original names.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim

from istfx.errors import CaptureError, ISTError


@dataclass
class Captured:
    """The exported program, its unlifted module, and the example inputs used."""

    program: torch.export.ExportedProgram
    module: fx.GraphModule
    args: tuple
    kwargs: dict


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of args, a dict of kwargs, or ``(args, kwargs)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], example_inputs[1]
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ISTError(
        f"example_inputs must be a tensor, a tuple of arguments, a dict of keyword arguments or "
        f"(args, kwargs); got {type(example_inputs).__name__}."
    )


def infer_example_inputs(model: nn.Module) -> tuple[tuple, dict]:
    """Example inputs from HF ``dummy_inputs`` or the first Linear/Conv/Embedding layer."""
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy:
        kwargs = {k: _at_least_batch_2(v) for k, v in dummy.items()}
        return (), kwargs
    for layer in model.modules():
        candidates = _candidates_for(layer)
        if candidates is None:
            continue
        for args in candidates:
            try:
                with torch.no_grad():
                    _run_in_eval(model, args)
                return args, {}
            except Exception:
                continue
        break
    raise ISTError(
        f"Cannot infer example inputs for {type(model).__name__}: its first layer is not a Linear, Conv "
        f"or Embedding whose input size fixes the rest. Pass them: "
        f"istfx.compile(model, subnets=S, example_inputs=(x,)) with a batch of at least 2."
    )


def _candidates_for(layer: nn.Module) -> list[tuple] | None:
    if isinstance(layer, nn.Linear):
        return [(torch.randn(4, layer.in_features),)]
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        rank = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(layer)]
        sides = [8, 16, 28, 32, 64, 224] if rank < 3 else [8, 16, 32]
        return [(torch.randn(4, layer.in_channels, *([side] * rank)),) for side in sides]
    if isinstance(layer, nn.Embedding):
        return [(torch.randint(0, layer.num_embeddings, (4, 8)),)]
    return None


def _run_in_eval(model: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
    was_training = model.training
    model.eval()
    try:
        model(*args, **(kwargs or {}))
    finally:
        model.train(was_training)


def _at_least_batch_2(value: Any) -> Any:
    # Export specialises size-1 dims; give batch and sequence room to stay dynamic.
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] < 2:
        value = value.expand(2, *value.shape[1:]).clone()
    return value


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """Capture with a Hugging Face config's ``use_cache`` off: a KV cache is not a graph output.

    The flag is set on the config for the capture only, so subnets keep the
    model's own call signature (no extra ``use_cache`` argument).
    """
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False
    try:
        yield
    finally:
        if before:
            config.use_cache = before


def dynamic_dims(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Per input tensor, the dims the model accepts at another size.

    Each dim is probed by growing it by one and by doubling it (repeating its
    last slice, so ids and indices stay valid) and running the model in eval
    mode: alone, then together with the same dim of the other inputs of equal
    size (a batch or sequence shared by ``input_ids`` and ``attention_mask``),
    then with every dim of equal size. A dim the model rejects (features
    feeding a Linear, image sides feeding a flatten) is static; export would
    otherwise carry it as a symbol whose relations it cannot solve.
    """
    inputs = {("a", i): v for i, v in enumerate(args)} | {("k", k): v for k, v in kwargs.items()}
    tensors = {key: v for key, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    free: dict[tuple, list[int]] = {key: [] for key in tensors}
    for key, value in tensors.items():
        for d in range(value.dim()):
            size = value.shape[d]
            candidates = [
                [(key, d)],
                [(k, d) for k, v in tensors.items() if v.dim() > d and v.shape[d] == size],
                [(k, e) for k, v in tensors.items() for e in range(v.dim()) if v.shape[e] == size],
            ]
            for dims_ in candidates:
                if all(_accepts(model, args, kwargs, _grow(tensors, dims_, extra)) for extra in (1, size)):
                    free[key].append(d)
                    break
    result = {key: ({d: Dim.AUTO for d in free[key]} or None) if key in tensors else None for key in inputs}
    return (tuple(result[("a", i)] for i in range(len(args))), {k: result[("k", k)] for k in kwargs})


def _grow(tensors: dict, dims_: list[tuple], extra: int) -> dict:
    grown = dict(tensors)
    for key, d in dims_:
        grown[key] = _grown(grown[key], d, extra)
    return grown


def _export(model: nn.Module, args: tuple, kwargs: dict, shapes: dict, dynamic: tuple[tuple, dict]
            ) -> torch.export.ExportedProgram:
    """Export so that dynamic dims admit size 1 (a batch of one, one token) where possible.

    Default export assumes dynamic dims are >= 2. Size-oblivious export drops
    that assumption, but some models (Hugging Face's mask code) then pick up
    guards such as ``size != 1`` instead. Both are tried when needed, and the
    one whose guards admit more size-1 dims wins.
    """
    def plain():
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)

    # A failed first attempt is expected (data-dependent guards, e.g. PyG's self-loop removal) and is
    # retried; export prints its partial graph to stderr on failure, so that text is kept only on success.
    printed = io.StringIO()
    try:
        with fx_config.patch(backed_size_oblivious=True), contextlib.redirect_stderr(printed):
            oblivious = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
    except Exception:
        return plain()
    sys.stderr.write(printed.getvalue())
    probes = _size_one_probes(args, kwargs, *dynamic)
    refused = _refused(oblivious, probes)
    if not refused:
        return oblivious
    default = plain()
    return default if len(_refused(default, probes)) < len(refused) else oblivious


def _size_one_probes(args: tuple, kwargs: dict, dyn_args: tuple, dyn_kwargs: dict) -> list[tuple[tuple, dict]]:
    """Inputs with one dynamic dim position shrunk to 1 (in every input where it is dynamic)."""
    positions = sorted({d for spec in [*dyn_args, *dyn_kwargs.values()] if spec for d in spec})

    def shrink(value: Any, spec: dict | None, d: int) -> Any:
        return value.narrow(d, 0, 1) if isinstance(value, torch.Tensor) and spec and d in spec else value

    return [
        (tuple(shrink(v, dyn, d) for v, dyn in zip(args, dyn_args)),
         {k: shrink(v, dyn_kwargs.get(k), d) for k, v in kwargs.items()})
        for d in positions
    ]


def _refused(program: torch.export.ExportedProgram, probes: list[tuple[tuple, dict]]) -> list[int]:
    """Indices of probes that the exported module's input guards reject."""
    module = program.module()
    buffers = dict(module.named_buffers())  # the user's buffers: a training-mode probe must not move them
    saved = {name: b.detach().clone() for name, b in buffers.items()}
    refused = []
    try:
        for i, (probe_args, probe_kwargs) in enumerate(probes):
            try:
                with torch.no_grad():
                    module(*probe_args, **probe_kwargs)
            except Exception as exc:  # guards fail first; anything later is the model's own business
                if "Guard failed" in str(exc) or "guard" in type(exc).__name__.lower():
                    refused.append(i)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)
    return refused


def _grown(value: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    last = value.narrow(dim, value.shape[dim] - 1, 1)
    return torch.cat([value, last.expand(*[extra if i == dim else -1 for i in range(value.dim())])], dim=dim)


def _accepts(model: nn.Module, args: tuple, kwargs: dict, grown: dict) -> bool:
    probe_args = tuple(grown.get(("a", i), v) for i, v in enumerate(args))
    probe_kwargs = {k: grown.get(("k", k), v) for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            _run_in_eval(model, probe_args, probe_kwargs)
        return True
    except Exception:
        return False


def capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    """Export `model` non-strict with every dim the model accepts at any size dynamic."""
    with _no_kv_cache(model):
        return _capture(model, args, kwargs)


def _capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    dyn_args, dyn_kwargs = dynamic_dims(model, args, kwargs)
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ISTError(f"example inputs do not match {type(model).__name__}.forward: {exc}") from exc
    by_value = {id(v): d for v, d in zip(args, dyn_args)} | {id(kwargs[k]): dyn_kwargs[k] for k in kwargs}
    shapes = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: by_value.get(id(v)) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(by_value.get(id(v)) for v in value)
        else:
            shapes[name] = by_value.get(id(value))
    was_training = model.training
    model.train()
    try:
        program = _export(model, tuple(args), dict(kwargs), shapes, (dyn_args, dyn_kwargs))
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
            "Hint: istfx needs a graph without data-dependent Python control flow. Check the model runs "
            "on the example inputs, pass example_inputs= explicitly (batch >= 2), and for Hugging Face "
            "models build them with use_cache=False. PyTorch's full reason is chained below."
        ) from exc
    finally:
        model.train(was_training)
    return Captured(program, program.module(), tuple(args), dict(kwargs))
