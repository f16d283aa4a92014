"""Model files: the one loader every ``istfx`` command uses.

A model file is ordinary Python that defines

- ``model`` (an ``nn.Module``) or ``build_model()`` (returning one), and optionally
- ``example_inputs``: a tensor, a tuple of arguments, a dict of keyword
  arguments, or ``(args, kwargs)``;
- for ``istfx train``: ``train_data()`` / ``eval_data()`` returning datasets
  of ``(input, label)`` pairs (or a pair of tensors), ``loss_fn``; or, for
  batches that are not rows of a dataset (graphs), ``train_batches(subnet,
  subnets, seed)`` and ``eval_batches()`` returning iterables of batches;
- for ``istfx fl``: ``train_data()`` / ``eval_data()`` and optionally
  ``client_data(client, clients, seed)``, a client's own dataset, used
  instead of a ``--dirichlet`` partition of ``train_data()``.

The file's folder is first on ``sys.path`` while it loads, so it can import
its neighbours. Problems are :class:`~istfx.errors.ISTError` s that say what
is wrong in the file and what to define instead.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from istfx.errors import ISTError

__all__ = ["ModelFile", "load_model_file"]

MODEL_FILE_HELP = """\
MODEL.py is a Python file that defines:
  model            an nn.Module instance, or
  build_model()    a function with no arguments that returns one;
  example_inputs   (optional) a tensor, a tuple of positional arguments, a dict
                   of keyword arguments, or (args, kwargs). Use a batch of at
                   least 2. When omitted, inputs come from a Hugging Face
                   model's dummy_inputs or from the model's first
                   Linear/Conv/Embedding layer.
  train_data(), eval_data()      (istfx train, istfx fl) datasets of
                   (input, label) pairs; istfx fl partitions train_data()
                   among its clients (--dirichlet) and evaluates on eval_data();
  client_data(client, clients, seed)   (istfx fl, optional) client `client`'s
                   own dataset out of `clients`; when defined each client
                   trains on it instead of a --dirichlet partition of
                   train_data() (eval_data() stays the held-out set).
The file's folder is on sys.path while it loads."""


@dataclass
class ModelFile:
    """A loaded model file: its model, its example inputs and the module it ran as."""

    path: Path
    model: Any  # torch.nn.Module
    example_inputs: Any
    module: Any

    @property
    def name(self) -> str:
        """The model's class name."""
        return type(self.model).__name__

    def function(self, name: str) -> Callable | None:
        """The file's function `name` (``train_data``, ``eval_batches``...), or None when it defines none."""
        value = getattr(self.module, name, None)
        return value if callable(value) else None

    def value(self, name: str, default: Any = None) -> Any:
        """The file's variable `name` (``loss_fn``...), or `default`."""
        return getattr(self.module, name, default)


def load_model_file(path: str | Path, *, meta: bool = False) -> ModelFile:
    """Run the model file at `path` and return what it defines.

    With `meta`, the file runs under ``torch.device("meta")``: parameters get
    no storage (their values come from a checkpoint or an initial state
    file), and the example inputs are moved to the meta device too.

    Raises:
        ISTError: the file is missing, fails while loading, or defines no
            ``nn.Module`` as ``model`` / ``build_model()``.
    """
    import torch
    from torch import nn

    path = Path(path)
    if not path.exists():
        raise ISTError(f"model file not found: {path}")
    if not path.is_file():
        raise ISTError(f"not a file: {path}")
    path = path.resolve()
    name = f"istfx_model_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ISTError(f"cannot load {path} as Python: use a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module  # stays: the model's classes live there (pickling, torch.export)
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(name, None)
                raise ISTError(f"{path.name} failed while loading: {_describe(exc, path)}") from exc
            model, where = _model_of(module, path)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    if not isinstance(model, nn.Module):
        raise ISTError(f"`{where}` in {path.name} is a {type(model).__name__}, not a torch.nn.Module")
    example_inputs = getattr(module, "example_inputs", None)
    if meta and example_inputs is not None:
        import torch.utils._pytree as pytree

        example_inputs = pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v,
                                         example_inputs)
    return ModelFile(path, model, example_inputs, module)


def _model_of(module: Any, path: Path) -> tuple[Any, str]:
    """The file's `model`, or what its `build_model()` returns, and which one it was."""
    if hasattr(module, "model"):
        return module.model, "model"
    if callable(getattr(module, "build_model", None)):
        try:
            return module.build_model(), "build_model()"
        except Exception as exc:
            raise ISTError(f"build_model() in {path.name} failed: {_describe(exc, path)}") from exc
    raise ISTError(
        f"{path.name} defines neither `model` nor `build_model()`: add `model = MyModel(...)` "
        "or `def build_model(): return MyModel(...)` (and optionally `example_inputs = ...`)"
    )


def _describe(exc: BaseException, path: Path) -> str:
    """'TypeError: message (at mlp.py:12)': the exception and its last line inside `path`."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    if frames:
        text += f" (at {path.name}:{frames[-1].lineno})"
    return text
