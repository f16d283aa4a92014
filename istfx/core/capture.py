"""Capture: a model's graph through one ``torch.export``, with the input dims that can be dynamic.

Example inputs are taken, in order, from the caller, from a Hugging Face
vision config (``pixel_values``) or model's ``dummy_inputs``, or inferred from
the model's first layer (Linear/Conv/Embedding). Which dims are dynamic is
decided before exporting (``dynamic=``, see :func:`capture`), so one export
usually suffices. The graph is exported non-strict, in training mode (so
batch norm and dropout are captured as they train; :mod:`istfx.core.modes`
makes them follow ``eval()``), and unlifted into a ``GraphModule`` whose
parameters keep their original names, with a pre-hook that checks input
shapes (:class:`InputShapes`). Capture leaves the model's state untouched
(:func:`state_unchanged`).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config
from torch.fx.experimental.symbolic_shapes import is_concrete_int
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

from istfx.core.modes import eval_mismatch
from istfx.errors import CaptureError, ISTError


@dataclass
class Captured:
    """The exported program, its unlifted module, and the example inputs used."""

    program: torch.export.ExportedProgram
    module: fx.GraphModule
    args: tuple
    kwargs: dict
    shapes: "InputShapes | None" = None  # the input sizes the graph accepts (a pre-hook checks them)
    specialized: list[str] = field(default_factory=list)  # input dims that are static, and why
    eval_refusal: str | None = None  # why subnets cannot run in evaluation mode (None: they can)


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
    """Example inputs from a Hugging Face config or ``dummy_inputs``, or the first Linear/Conv/Embedding layer."""
    pixels = _pixel_values_from_config(model)
    if pixels is not None:
        return (), {"pixel_values": pixels}
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


def _pixel_values_from_config(model: nn.Module) -> torch.Tensor | None:
    """A batch of 2 images sized by a Hugging Face vision config (``num_channels``, ``image_size``).

    Vision models' generic ``dummy_inputs`` hold ``input_ids``, which they do
    not take; their config says what an image is.
    """
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) != "pixel_values" or config is None:
        return None
    config = getattr(config, "vision_config", None) or config
    side = getattr(config, "image_size", None)
    if isinstance(side, int):
        height = width = side
    elif isinstance(side, (list, tuple)) and len(side) == 2 and all(isinstance(v, int) for v in side):
        height, width = side
    else:
        return None
    channels = getattr(config, "num_channels", 3)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(2, channels, height, width, dtype=dtype)


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


def dynamic_dims(model: nn.Module, args: tuple, kwargs: dict, allowed: Callable[[tuple, int], bool] | None = None
                 ) -> tuple[tuple, dict]:
    """Per input tensor, the dims the model accepts at another size.

    Each dim is probed by growing it by one and by doubling it (repeating its
    last slice, so ids and indices stay valid) and running the model in eval
    mode: alone, then together with the same dim of the other inputs of equal
    size (a batch or sequence shared by ``input_ids`` and ``attention_mask``),
    then with every dim of equal size. A dim the model rejects (features
    feeding a Linear, image sides feeding a flatten) is static; export would
    otherwise carry it as a symbol whose relations it cannot solve. Only dims
    for which ``allowed(key, dim)`` holds are probed (and grown); the others
    stay static without a probe.
    """
    inputs = {("a", i): v for i, v in enumerate(args)} | {("k", k): v for k, v in kwargs.items()}
    tensors = {key: v for key, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    ok = allowed or (lambda key, d: True)
    free: dict[tuple, list[int]] = {key: [] for key in tensors}
    for key, value in tensors.items():
        for d in range(value.dim()):
            if not ok(key, d):
                continue
            size = value.shape[d]
            candidates = [
                [(key, d)],
                [(k, d) for k, v in tensors.items() if v.dim() > d and v.shape[d] == size and ok(k, d)],
                [(k, e) for k, v in tensors.items() for e in range(v.dim()) if v.shape[e] == size and ok(k, e)],
            ]
            tried: list[list[tuple]] = []
            for dims_ in candidates:
                if dims_ in tried:
                    continue
                tried.append(dims_)
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


@contextlib.contextmanager
def state_unchanged(model: nn.Module):
    """Leave `model`'s parameters and buffers bit-for-bit as they were; refuse forwards that change parameters.

    Capture runs the model (probes, export's tracing, the evaluation check);
    a forward that updates buffers (batch norm's running statistics) would
    move them, and one that writes a parameter (``self.w.data.add_(1)``)
    would change the user's weights. Everything is restored on exit; a
    changed parameter raises :class:`ISTError` naming it.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    params = {name for name, _ in model.named_parameters()}
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
    changed = [n for n, t in tensors.items() if t.shape != saved[n].shape
               or (not t.is_meta and not torch.equal(t.detach(), saved[n]))]  # meta tensors hold no values
    with torch.no_grad():
        for name in changed:
            tensor = tensors[name]
            if tensor.shape != saved[name].shape:
                tensor.data = saved[name]
            else:
                tensor.copy_(saved[name])
    written = [n for n in changed if n in params]
    if written:
        raise ISTError(
            f"{type(model).__name__}'s forward changes its parameter(s) {', '.join(written[:4])}"
            f"{' ...' if len(written) > 4 else ''} in place; istfx cannot split a model that writes its own "
            "weights during a forward pass (the update would not be a graph op that subnets can carry). "
            "Move the update out of forward (e.g. into the training step). Your model is unchanged."
        ) from error
    if error is not None:
        raise error


DYNAMIC_MODES = ("auto", "all", "batch", "static")


def parse_dynamic(dynamic: Any) -> str | dict[str, tuple[int, ...]]:
    """Validate ``istfx.compile``'s `dynamic`: a mode name, False, or {input name: dynamic dims}."""
    if dynamic is False or dynamic is None:
        return "static"
    if dynamic is True:
        return "all"
    if isinstance(dynamic, str) and dynamic in DYNAMIC_MODES:
        return dynamic
    if isinstance(dynamic, dict) and all(isinstance(k, str) for k in dynamic):
        spec = {}
        for name, dims in dynamic.items():
            dims = (dims,) if isinstance(dims, int) else dims
            if not isinstance(dims, (tuple, list, set)) or not all(
                    isinstance(d, int) and not isinstance(d, bool) for d in dims):
                raise ISTError(f"dynamic[{name!r}] must be a tuple of dim indices, got {dims!r}.")
            spec[name] = tuple(sorted(set(dims)))
        return spec
    raise ISTError(
        f"dynamic must be 'auto', 'all', 'batch', False or a dict {{input name: (dims, ...)}}; got {dynamic!r}."
    )


def _is_image_side(value: torch.Tensor, dim: int) -> bool:
    """Image, volume or video sides: dims >= 2 of a floating input of rank >= 4 (N, C, H, W...)."""
    return value.is_floating_point() and value.dim() >= 4 and dim >= 2


@dataclass(frozen=True)
class InputShapes:
    """The sizes captured for the model's tensor inputs, and a check subnets run on every call.

    ``dims[name]`` lists, per tensor leaf of argument `name` (in pytree order),
    one entry per dimension: an int where the graph is fixed to that size, or
    ``(low, label)`` where it accepts any size >= low. The check is a forward
    pre-hook: a wrong input names the expected shape (an :class:`ISTError`)
    instead of torch.export's raw guard failure.
    """

    names: tuple[str, ...]  # the forward's parameter names, in order
    dims: dict[str, list[tuple]]

    def describe(self, name: str, leaf: int = 0) -> str:
        """'(batch, 8)': the shape argument `name` (tensor leaf `leaf`) must have."""
        parts = [str(d) if isinstance(d, int) else (d[1] if d[0] <= 1 else f"{d[1]}>={d[0]}")
                 for d in self.dims[name][leaf]]
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(self.names, args)) | kwargs
        for name, expected in self.dims.items():
            if name not in bound:
                continue
            got = [x for x in pytree.tree_leaves(bound[name]) if isinstance(x, torch.Tensor)]
            if len(got) != len(expected):
                continue  # another structure: the graph's own checks report it
            for leaf, (tensor, dims) in enumerate(zip(got, expected)):
                shape = tuple(tensor.shape)
                wrong = len(shape) != len(dims) or any(
                    (size != d) if isinstance(d, int) else size < d[0] for size, d in zip(shape, dims))
                if wrong:
                    where = name if len(expected) == 1 else f"{name} (tensor {leaf})"
                    if len(shape) != len(dims):
                        detail = f"{len(dims)} dims, not {len(shape)}"
                    else:
                        detail = "; ".join(
                            f"dim {i} must be {d}" if isinstance(d, int) else f"dim {i} must be >= {d[0]}"
                            for i, (size, d) in enumerate(zip(shape, dims))
                            if (size != d if isinstance(d, int) else size < d[0]))
                    raise ISTError(
                        f"input {where} has shape {shape}, expected {self.describe(name, leaf)} ({detail}). "
                        "Fixed sizes come from the model's layers or from capture (plan.specialized lists "
                        "dims that could not stay dynamic); compile with other example inputs or dynamic=... "
                        "to change them."
                    )


def capture(model: nn.Module, args: tuple, kwargs: dict, dynamic: Any = "auto") -> Captured:
    """Export `model` non-strict, once, with the dims that `dynamic` asks for dynamic.

    ``"auto"`` (default): the batch and every other dim the model accepts at
    another size are dynamic, except image sides (dims >= 2 of a floating
    input of rank >= 4), which are static: symbolic image sides make
    torch.export slow (windowed attention: minutes) or fail (adaptive pooling
    of small images). When export fails, it retries with the batch only, then
    with every dim static. ``"all"``: every dim the model accepts at another
    size, image sides included. ``"batch"``: only dim 0. ``False``: all
    static. A dict ``{input name: (dims, ...)}`` names the dynamic dims per
    input. What ends up static is listed in :attr:`Captured.specialized`.
    """
    mode = parse_dynamic(dynamic)
    with _no_kv_cache(model):
        return _capture(model, args, kwargs, mode)


def _signature_names(model: nn.Module, args: tuple, kwargs: dict) -> tuple[inspect.Signature, dict[tuple, str]]:
    """The forward's signature and, per input key ("a", i) / ("k", name), its parameter name."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ISTError(f"example inputs do not match {type(model).__name__}.forward: {exc}") from exc
    by_id = {id(v): ("a", i) for i, v in enumerate(args)} | {id(v): ("k", k) for k, v in kwargs.items()}
    names = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            names.update({by_id[id(v)]: k for k, v in value.items() if id(v) in by_id})
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            names.update({by_id[id(v)]: f"{name}[{i}]" for i, v in enumerate(value) if id(v) in by_id})
        elif id(value) in by_id:
            names[by_id[id(value)]] = name
    return signature, names


def _allowed_dims(mode: str | dict, args: tuple, kwargs: dict, names: dict[tuple, str]) -> Callable[[tuple, int], bool]:
    inputs = {("a", i): v for i, v in enumerate(args)} | {("k", k): v for k, v in kwargs.items()}
    if isinstance(mode, dict):
        unknown = sorted(set(mode) - set(names.values()))
        if unknown:
            raise ISTError(f"dynamic names {unknown}, which are not tensor inputs; the inputs are "
                           f"{sorted(names.values())}.")
        for key, name in names.items():
            value = inputs[key]
            bad = [d for d in mode.get(name, ()) if not isinstance(value, torch.Tensor) or not 0 <= d < value.dim()]
            if bad:
                raise ISTError(f"dynamic[{name!r}] names dims {bad}, but {name} has "
                               f"{value.dim() if isinstance(value, torch.Tensor) else 0} dims.")
        return lambda key, d: d in mode.get(names.get(key, ""), ())
    if mode == "static":
        return lambda key, d: False
    if mode == "batch":
        return lambda key, d: d == 0
    if mode == "all":
        return lambda key, d: True
    return lambda key, d: not _is_image_side(inputs[key], d)


def _export_once(model: nn.Module, args: tuple, kwargs: dict, shapes: dict, dyn: tuple[tuple, dict]
                 ) -> tuple[torch.export.ExportedProgram, set[int]]:
    """Export so that dynamic dims admit size 1 (a batch of one, one token) where possible, once if it can.

    Default export assumes dynamic dims are >= 2; size-oblivious export drops
    that assumption, but some models (Hugging Face's mask code) then pick up
    guards such as ``size != 1`` instead, while their default export runs at
    size 1. The likelier one is tried first (default for Hugging Face models,
    size-oblivious otherwise); the other only when the first fails or its
    guards refuse a size-1 probe, and the one admitting more size-1 dims wins.
    Returns the program and the dim positions whose size 1 it refuses.
    """
    def oblivious():
        printed = io.StringIO()  # export prints its partial graph on failure; keep that text only on success
        with fx_config.patch(backed_size_oblivious=True), contextlib.redirect_stderr(printed):
            program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
        sys.stderr.write(printed.getvalue())
        return program

    def plain():
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)

    first, second = (plain, oblivious) if hasattr(model, "config") else (oblivious, plain)
    positions, probes = _size_one_probes(args, kwargs, *dyn)
    try:
        program = first()
    except Exception:  # expected on some graphs (data-dependent guards, e.g. PyG's self-loop removal)
        program = second()
        return program, {positions[i] for i in _refused(program, probes)}
    refused = _refused(program, probes)
    if refused:
        try:
            other = second()
        except Exception:
            other = None
        if other is not None:
            refused_other = _refused(other, probes)
            if len(refused_other) < len(refused):
                program, refused = other, refused_other
    return program, {positions[i] for i in refused}


def _size_one_probes(args: tuple, kwargs: dict, dyn_args: tuple, dyn_kwargs: dict
                     ) -> tuple[list[int], list[tuple[tuple, dict]]]:
    """Per dynamic dim position, inputs with it shrunk to 1 (in every input where it is dynamic)."""
    positions = sorted({d for spec in [*dyn_args, *dyn_kwargs.values()] if spec for d in spec})

    def shrink(value: Any, spec: dict | None, d: int) -> Any:
        return value.narrow(d, 0, 1) if isinstance(value, torch.Tensor) and spec and d in spec else value

    return positions, [
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


def _shapes_for(signature: inspect.Signature, args: tuple, kwargs: dict, dyn: tuple[tuple, dict]) -> dict:
    """torch.export's ``dynamic_shapes``: per forward parameter, the spec of its value."""
    dyn_args, dyn_kwargs = dyn
    bound = signature.bind(*args, **kwargs)
    by_value = {id(v): d for v, d in zip(args, dyn_args)} | {id(kwargs[k]): dyn_kwargs[k] for k in kwargs}
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: by_value.get(id(v)) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(by_value.get(id(v)) for v in value)
        else:
            shapes[name] = by_value.get(id(value))
    return shapes


def _capture(model: nn.Module, args: tuple, kwargs: dict, mode: str | dict) -> Captured:
    signature, names = _signature_names(model, args, kwargs)
    inputs = {("a", i): v for i, v in enumerate(args)} | {("k", k): v for k, v in kwargs.items()}
    dyn = dynamic_dims(model, args, kwargs, _allowed_dims(mode, args, kwargs, names))
    attempts = [(dyn, "")]
    if mode == "auto":  # fall back to fewer dynamic dims when export cannot solve the symbolic shapes
        batch_only = (tuple({0: s[0]} if s and 0 in s else None for s in dyn[0]),
                      {k: ({0: s[0]} if s and 0 in s else None) for k, s in dyn[1].items()})
        if batch_only != dyn:
            attempts.append((batch_only, "batch only"))
        if any(batch_only[0]) or any(batch_only[1].values()):
            attempts.append((((None,) * len(args), dict.fromkeys(kwargs)), "all static"))
    was_training = model.training
    model.train()
    failures: list[str] = []
    program, no_size_one = None, set()
    try:
        for spec, label in attempts:
            try:
                program, no_size_one = _export_once(model, tuple(args), dict(kwargs),
                                                    _shapes_for(signature, args, kwargs, spec), spec)
                dyn = spec
                break
            except Exception as exc:
                failures.append(f"{label or 'as asked'}: {type(exc).__name__}: {_first_line(exc)}")
                if len(failures) == len(attempts):
                    raise
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {_first_line(exc)}\n"
            "Hint: istfx needs a graph without data-dependent Python control flow. Check the model runs "
            "on the example inputs, pass example_inputs= explicitly (batch >= 2), and for Hugging Face "
            "models build them with use_cache=False. PyTorch's full reason is chained below."
        ) from exc
    finally:
        model.train(was_training)
    assert program is not None
    shapes, specialized = _captured_shapes(program, signature, inputs, names, dyn, mode, no_size_one)
    if failures and len(attempts) > 1:
        specialized.insert(0, f"export with these dims dynamic failed ({failures[0]}); captured with "
                              f"{attempts[len(failures)][1]}")
    module = program.module()
    module.register_forward_pre_hook(shapes, prepend=True, with_kwargs=True)
    refusal = eval_mismatch(model, module, tuple(args), dict(kwargs))
    return Captured(program, module, tuple(args), dict(kwargs), shapes, specialized, refusal)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _captured_shapes(program: torch.export.ExportedProgram, signature: inspect.Signature, inputs: dict,
                     names: dict[tuple, str], dyn: tuple[tuple, dict], mode: str | dict, no_size_one: set[int]
                     ) -> tuple[InputShapes, list[str]]:
    """The graph's input sizes (static, or any size) and a line per input dim that is not dynamic or
    whose size-1 probe the graph refused."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    values = [placeholders[n].meta.get("val") for n in program.graph_signature.user_inputs]
    fake_args, fake_kwargs = pytree.tree_unflatten(values, program.call_spec.in_spec)
    fakes = {("a", i): v for i, v in enumerate(fake_args)} | {("k", k): v for k, v in fake_kwargs.items()}
    asked = {("a", i): s for i, s in enumerate(dyn[0])} | {("k", k): s for k, s in dyn[1].items()}
    labels = {0: "batch"}
    dims: dict[str, list[tuple]] = {}
    specialized: list[str] = []
    for key, name in names.items():
        fake, value = fakes.get(key), inputs[key]
        if not isinstance(fake, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        entry = []
        for d, size in enumerate(fake.shape):
            if is_concrete_int(size):  # an int, or a symbol export specialised to a constant
                size = int(size)
                entry.append(size)
                if asked.get(key) and d in asked[key]:
                    specialized.append(f"{name} dim {d} = {size}: torch.export fixed it (the model's code depends "
                                       "on its size, e.g. a Python loop over it)")
                elif mode == "auto" and _is_image_side(value, d):
                    specialized.append(f"{name} dim {d} = {size}: image side, static (dynamic='all' keeps it "
                                       "dynamic)")
                elif mode not in ("auto", "all") and not (isinstance(mode, dict) and d in mode.get(name, ())):
                    specialized.append(f"{name} dim {d} = {size}: static (dynamic={mode!r})")
                continue
            entry.append((0, labels.get(d, f"n{d}")))
            if d in no_size_one:  # not enforced: the guard may hold on other dims too (batch x H x W != 1)
                specialized.append(f"{name} dim {d}: the graph's guards refused size 1 at the example's "
                                   "other sizes")
        dims[name] = [tuple(entry)]
    params = tuple(p.name for p in signature.parameters.values()
                   if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return InputShapes(params, dims), specialized
