"""istfx: Independent Subnet Training for any PyTorch model.

``ist = istfx.compile(model, subnets=4)`` captures the model with
``torch.export``, infers which axes can be cut into independent subnetworks,
and plans the decomposition; ``ist.decompose(round)`` and
``ist.reassemble(subnets)`` cut and rejoin the model each round;
``istfx.fit`` runs whole IST training.
"""
from .compiler import ISTModel, ReassembleReport, SubnetInfo, compile
from .errors import CaptureError, ISTError, NonFiniteUpdateError, UnsupportedOpError
from .plan import Disjoint, Overlap, Plan, Rolling
from .rules import OpContext, register_rule
from .training import History, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "compile", "ISTModel", "ReassembleReport", "SubnetInfo", "Plan", "Disjoint", "Overlap", "Rolling",
    "register_rule", "OpContext", "fit", "evaluate", "History", "ISTError", "CaptureError", "UnsupportedOpError", "NonFiniteUpdateError",
]
