"""istfx: Independent Subnet Training for any PyTorch model.

``ist = istfx.compile(model, subnets=4)`` captures the model with
``torch.export``, infers which axes can be cut into independent subnetworks,
and plans the decomposition; ``ist.decompose(round)`` and
``ist.reassemble(subnets)`` cut and rejoin the model each round;
``istfx.fit`` runs whole IST training.

Names are loaded on first use, so ``import istfx`` (and ``istfx --help``) does
not import torch until something needs it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "compile": ("istfx.api", "compile"),
    "ISTModel": ("istfx.core.compiler", "ISTModel"),
    "ReassembleReport": ("istfx.core.compiler", "ReassembleReport"),
    "SubnetInfo": ("istfx.core.compiler", "SubnetInfo"),
    "Plan": ("istfx.core.plan", "Plan"),
    "Disjoint": ("istfx.core.plan", "Disjoint"),
    "Overlap": ("istfx.core.plan", "Overlap"),
    "Rolling": ("istfx.core.plan", "Rolling"),
    "Nested": ("istfx.core.plan", "Nested"),
    "register_rule": ("istfx.core.rules", "register_rule"),
    "OpContext": ("istfx.core.rules", "OpContext"),
    "fit": ("istfx.runtime.training", "fit"),
    "evaluate": ("istfx.runtime.training", "evaluate"),
    "History": ("istfx.runtime.training", "History"),
    "ISTError": ("istfx.errors", "ISTError"),
    "CaptureError": ("istfx.errors", "CaptureError"),
    "UnsupportedOpError": ("istfx.errors", "UnsupportedOpError"),
    "NonFiniteUpdateError": ("istfx.errors", "NonFiniteUpdateError"),
    "NothingToSplitError": ("istfx.errors", "NothingToSplitError"),
    # subpackages and the GIST data modules, as `istfx.models`, `from istfx import graphs`
    "models": ("istfx.models", None),
    "passes": ("istfx.passes", None),
    "backends": ("istfx.backends", None),
    "testing": ("istfx.testing", None),
    "graphs": ("istfx.graph.graphs", None),
    "gist": ("istfx.graph.gist", None),
    "graph_datasets": ("istfx.graph.datasets", None),
}

__all__ = [name for name, (_, attr) in _EXPORTS.items() if attr is not None]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'istfx' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from istfx.api import compile
    from istfx.core.compiler import ISTModel, ReassembleReport, SubnetInfo
    from istfx.core.plan import Disjoint, Nested, Overlap, Plan, Rolling
    from istfx.core.rules import OpContext, register_rule
    from istfx.errors import CaptureError, ISTError, NonFiniteUpdateError, NothingToSplitError, UnsupportedOpError
    from istfx.runtime.training import History, evaluate, fit
