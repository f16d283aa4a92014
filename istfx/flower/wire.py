"""What travels between the IST server and its clients: a subnet's description and its tensors.

A client gets one :class:`SubnetDescription` (as a ``ConfigRecord``) and the
subnet's tensors (as an ``ArrayRecord``): only the slices its subnet holds,
never the full model. The description names the round, the subnet slot, how
many units of each split group the slot holds and which residual blocks it
keeps, plus a fingerprint of the plan; with the same model file and compile
options the client derives the same plan on the meta device and picks the
subnet template from it (:func:`istfx.flower.subnets.instantiate`).

Usage::

    config = describe(ist, round, slot).to_config()
    arrays = tensors_to_record(tensors)
    ...
    description = SubnetDescription.from_config(config)
    tensors = record_to_tensors(arrays, expected={name: (shape, dtype)})
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from istfx.errors import ISTError

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord

    from istfx.core.compiler import ISTModel

__all__ = ["SubnetDescription", "WireError", "describe", "payload_bytes", "plan_fingerprint", "record_to_tensors",
           "tensors_to_record"]

_KEYS = ("round", "slot", "sizes", "held-blocks", "fingerprint")


class WireError(ISTError):
    """A message between server and client does not hold what the other side expects."""


@dataclass(frozen=True)
class SubnetDescription:
    """Enough to rebuild one subnet from the plan: round, slot, units per split group, kept blocks.

    Attributes:
        round: the IST round (from 0) whose assignment the tensors follow.
        slot: the subnet slot (0 .. S-1).
        sizes: units the slot holds of each split group, in ``plan.split`` order.
        held_blocks: indices into ``plan.blocks`` the slot keeps (depth).
        fingerprint: :func:`plan_fingerprint` of the server's plan.
    """

    round: int
    slot: int
    sizes: tuple[int, ...]
    held_blocks: tuple[int, ...]
    fingerprint: str

    def to_config(self) -> dict:
        """The description as ``ConfigRecord`` values (ints, lists of ints, a string)."""
        return {"round": self.round, "slot": self.slot, "sizes": list(self.sizes),
                "held-blocks": list(self.held_blocks), "fingerprint": self.fingerprint}

    @classmethod
    def from_config(cls, config: "ConfigRecord | dict") -> "SubnetDescription":
        """Read a description written by :meth:`to_config`; a missing or ill-typed field is a :class:`WireError`."""
        missing = [k for k in _KEYS if k not in config]
        if missing:
            raise WireError(f"the subnet description lacks {', '.join(missing)}: the server and client istfx "
                            "versions differ or the message is not an IST train message.")
        try:
            round, slot = _int(config["round"]), _int(config["slot"])
            sizes = tuple(_int(v) for v in _list(config["sizes"]))
            held = tuple(_int(v) for v in _list(config["held-blocks"]))
        except (TypeError, ValueError) as exc:
            raise WireError(f"the subnet description is malformed: {exc}") from None
        fingerprint = config["fingerprint"]
        if not isinstance(fingerprint, str) or not fingerprint:
            raise WireError("the subnet description's fingerprint must be a non-empty string.")
        if round < 0 or slot < 0 or any(s < 1 for s in sizes) or any(b < 0 for b in held):
            raise WireError(f"the subnet description has negative or empty fields: round {round}, slot {slot}, "
                            f"sizes {list(sizes)}, blocks {list(held)}.")
        return cls(round, slot, sizes, held, fingerprint)

    def check(self, ist: "ISTModel") -> None:
        """Refuse a description that does not fit `ist`'s plan (other model, options or istfx version)."""
        plan = ist.plan
        mine = plan_fingerprint(ist)
        if self.fingerprint != mine:
            raise WireError(f"the server's plan ({self.fingerprint[:12]}) differs from this client's "
                            f"({mine[:12]}): both sides must load the same model file with the same compile "
                            "options and istfx version.")
        if self.slot >= plan.subnets:
            raise WireError(f"subnet slot {self.slot} does not exist: the plan has {plan.subnets} subnets.")
        expected = tuple(plan.counts(plan.groups[g])[self.slot] for g in plan.split)
        if self.sizes != expected:
            raise WireError(f"slot {self.slot} holds {list(expected)} units per split group in this plan, "
                            f"the message says {list(self.sizes)}.")
        if any(b >= len(plan.blocks) for b in self.held_blocks):
            raise WireError(f"block indices {list(self.held_blocks)} out of range: the plan deals out "
                            f"{len(plan.blocks)} blocks.")


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def _list(value) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {value!r}")
    return list(value)


def plan_fingerprint(ist: "ISTModel") -> str:
    """A hash of what both sides must agree on: split groups and their units, subnets, sizes, policy,
    blocks, and every state tensor's name, shape and kind."""
    plan = ist.plan
    data = {
        "subnets": plan.subnets,
        "policy": plan.to_dict()["policy"],
        "seed": plan.seed,
        "sizes": list(plan.sizes) if plan.sizes else None,
        "split": [[g, plan.groups[g].units] for g in plan.split],
        "blocks": [b.module for b in plan.blocks],
        "state": sorted([n, list(plan.state_shapes[n]), k] for n, k in plan.state_kinds.items()),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def describe(ist: "ISTModel", round: int, slot: int) -> SubnetDescription:
    """The description of subnet `slot` in IST round `round` of `ist`."""
    plan = ist.plan
    sizes = tuple(plan.counts(plan.groups[g])[slot] for g in plan.split)
    held = tuple(plan.block_assignment(round)[slot])
    return SubnetDescription(round, slot, sizes, held, plan_fingerprint(ist))


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> "ArrayRecord":
    """An ``ArrayRecord`` holding `tensors` by name (detached CPU copies)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={n: t.detach().cpu().contiguous() for n, t in tensors.items()})


def record_to_tensors(record: "ArrayRecord",
                      expected: dict[str, tuple[tuple[int, ...] | None, torch.dtype]]) -> dict[str, torch.Tensor]:
    """The tensors of `record`, checked against `expected` (name -> (shape or None, dtype)).

    Raises:
        WireError: names missing or unexpected, a shape or dtype that differs,
            or a non-finite floating-point value.
    """
    names = set(record.keys())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise WireError(f"the tensors received do not match the subnet: missing {missing[:4]}, unexpected "
                        f"{extra[:4]}.")
    out = {}
    for name, (shape, dtype) in expected.items():
        array = record[name]
        tensor = torch.from_numpy(array.numpy().copy())
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise WireError(f"{name}: received shape {tuple(tensor.shape)}, expected {tuple(shape)}.")
        if tensor.dtype != dtype:
            raise WireError(f"{name}: received {tensor.dtype}, expected {dtype}.")
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise WireError(f"{name}: received non-finite values.")
        out[name] = tensor
    return out


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensor data in `tensors` (what a message carries, without framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
