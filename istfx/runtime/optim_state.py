"""Optimizer state that travels with its units.

A subnet's optimizer holds, for every parameter, tensors shaped like it
(SGD's ``momentum_buffer``, Adam's ``exp_avg`` and ``exp_avg_sq``) and
scalars (Adam's ``step``). When optimizer state is carried across rounds
(``fit(..., optimizer_state="carry")``), the shaped tensors are cut and
written back exactly like their parameter (:class:`istfx.core.slicing.RoundSlices`),
so a hidden unit's moments go wherever the unit goes; shared parameters keep
theirs (averaged over the subnets that trained them, like the parameter).
Scalars are kept as the maximum over the subnets (every subnet takes the same
number of steps, so this is the common value).

Three holders, one per place the state can live:

- :class:`FullState`: the full-size state in one process (the local backend,
  rank 0 of the ps topology): :meth:`~FullState.for_subnet` cuts a subnet's
  slice, :meth:`~FullState.write_back` puts trained slices back;
- :class:`HeldState`: the state of the slices one rank holds (the sharded
  topology, where no rank holds the full state);
- on the training side, :func:`attach` hands a state to the subnet module
  and :func:`load_into` / :func:`extract` move it into and out of the
  optimizer the local-training closure builds.

:func:`flatten` / :func:`unflatten` turn a subnet's state into a list of
tensors plus a layout (:func:`encode_layout` makes the layout a byte tensor),
so backends can send it next to the parameters.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from istfx.core.slicing import RoundSlices
from istfx.errors import ISTError

__all__ = [
    "MODES",
    "FullState",
    "HeldState",
    "StateDict",
    "attach",
    "attached",
    "check_mode",
    "encode_layout",
    "decode_layout",
    "extract",
    "flatten",
    "load_into",
    "pack_state",
    "state_nbytes",
    "trained_names",
    "unflatten",
    "unpack_state",
]

StateDict = dict[str, dict[str, Any]]
"""Parameter name (as captured) -> optimizer state key -> tensor or number."""

MODES = ("reset", "carry")
"""``reset``: a fresh optimizer per subnet per round (the IST paper); ``carry``: the state travels with its units."""

_ATTR = "istfx_optimizer_state"


def check_mode(mode: str) -> str:
    """``mode`` normalised, or an :class:`ISTError` naming the choices."""
    value = str(mode).strip().lower()
    if value not in MODES:
        raise ISTError(f"optimizer_state must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}.")
    return value


# -- the subnet side -------------------------------------------------------------------------------
def attach(subnet: nn.Module, state: StateDict | None) -> None:
    """Give `subnet` the optimizer state it starts the round with (None: a fresh optimizer)."""
    setattr(subnet, _ATTR, state)


def attached(subnet: nn.Module) -> StateDict | None:
    """The state :func:`attach` gave `subnet`, or None."""
    return getattr(subnet, _ATTR, None)


def trained_names(subnet: nn.Module) -> list[str]:
    """Names (as captured) of the parameters `subnet` trains, tied ones under every name."""
    return [n for n, p in subnet.named_parameters(remove_duplicate=False) if p.requires_grad]


def load_into(optimizer: torch.optim.Optimizer, parameters: Mapping[str, nn.Parameter], state: StateDict) -> None:
    """Load `state` into `optimizer` for the named `parameters` (entries for other names are ignored).

    Shaped tensors move to their parameter's device and dtype as the
    optimizer keeps them; scalar tensors (Adam's ``step``) stay where they
    were, as the optimizer expects.
    """
    for name, entry in state.items():
        param = parameters.get(name)
        if param is None or not entry:
            continue
        loaded = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().clone()
                if value.dim() > 0:
                    value = value.to(param.device)
            loaded[key] = value
        optimizer.state[param] = loaded


def extract(optimizer: torch.optim.Optimizer, parameters: Mapping[str, nn.Parameter]) -> StateDict:
    """The per-parameter state of `optimizer`, keyed by the names of `parameters` (detached)."""
    out: StateDict = {}
    for name, param in parameters.items():
        entry = optimizer.state.get(param)
        if entry:
            out[name] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in entry.items()
                         if v is not None}
    return out


def state_nbytes(state: StateDict | None) -> int:
    """Bytes of the tensors in `state`."""
    if not state:
        return 0
    return sum(v.numel() * v.element_size() for entry in state.values() for v in entry.values()
               if isinstance(v, torch.Tensor))


# -- on the wire -------------------------------------------------------------------------------------
Layout = list[tuple[str, str, tuple[int, ...], str]]
"""One entry per tensor: (parameter name, key, shape, dtype name; ``"python"`` for a plain number)."""


def flatten(state: StateDict, names: Sequence[str] | None = None) -> tuple[Layout, list[torch.Tensor]]:
    """`state` as a layout and a list of tensors, in the order of `names` (default: sorted), keys sorted.

    Plain numbers become 0-d float64 tensors and come back as floats.
    """
    layout: Layout = []
    tensors: list[torch.Tensor] = []
    for name in (names if names is not None else sorted(state)):
        for key in sorted(state.get(name) or {}):
            value = state[name][key]
            if isinstance(value, torch.Tensor):
                layout.append((name, key, tuple(value.shape), str(value.dtype).removeprefix("torch.")))
                tensors.append(value.detach())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                layout.append((name, key, (), "python"))
                tensors.append(torch.tensor(float(value), dtype=torch.float64))
            else:
                raise ISTError(f"optimizer state {name}[{key!r}] is a {type(value).__name__}: only tensors and "
                               "numbers can travel with their units; use optimizer_state='reset' for this "
                               "optimizer.")
    return layout, tensors


def layout_specs(layout: Layout) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor of `layout`, as the receiver allocates them."""
    return [(shape, torch.float64 if dtype == "python" else getattr(torch, dtype)) for _, _, shape, dtype in layout]


def unflatten(layout: Layout, tensors: Sequence[torch.Tensor]) -> StateDict:
    """The inverse of :func:`flatten`."""
    if len(layout) != len(tensors):
        raise ISTError(f"optimizer state layout has {len(layout)} entries but {len(tensors)} tensors arrived.")
    out: StateDict = {}
    for (name, key, _, dtype), value in zip(layout, tensors):
        out.setdefault(name, {})[key] = float(value) if dtype == "python" else value
    return out


def encode_layout(layout: Layout) -> torch.Tensor:
    """`layout` as a uint8 tensor (JSON), to send ahead of the state."""
    data = json.dumps([[n, k, list(s), d] for n, k, s, d in layout]).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.empty(0, dtype=torch.uint8)


def decode_layout(data: torch.Tensor) -> Layout:
    """The inverse of :func:`encode_layout`."""
    if data.numel() == 0:
        return []
    return [(n, k, tuple(s), d) for n, k, s, d in json.loads(bytes(data.cpu().tolist()).decode())]


def pack_state(state: StateDict, names: Sequence[str] | None = None, compress: str | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """`state` as one uint8 buffer to send, and the length of the layout at its front.

    The buffer is the layout (:func:`encode_layout`), then the tensors
    shaped like their parameter (quantized with `compress`, as the
    parameters are), then the scalars (never quantized: step counts stay exact).
    """
    from istfx.runtime import comm

    layout, tensors = flatten(state, names)
    shaped = [t for t in tensors if t.dim() > 0]
    scalars = [t for t in tensors if t.dim() == 0]
    head = encode_layout(layout)
    device = torch.device(device) if device is not None else torch.device("cpu")
    body = [head.to(device)]
    if shaped:
        body.append(comm.pack(shaped, compress, device=device))
    if scalars:
        body.append(comm.pack(scalars, None, device=device))
    return torch.cat(body) if len(body) > 1 else body[0], head.numel()


def unpack_state(buffer: torch.Tensor, layout_nbytes: int, compress: str | None = None) -> StateDict:
    """The state :func:`pack_state` put in `buffer` (tensors on the buffer's device)."""
    from istfx.runtime import comm

    layout = decode_layout(buffer[:layout_nbytes])
    specs = [comm.Spec(shape, dtype) for shape, dtype in layout_specs(layout)]
    shaped = [sp for sp in specs if len(sp.shape) > 0]
    scalars = [sp for sp in specs if len(sp.shape) == 0]
    offset = layout_nbytes
    size = comm.packed_nbytes(shaped, compress)
    shaped_values = iter(comm.unpack(buffer[offset:offset + size], shaped, compress) if shaped else [])
    offset += size
    scalar_values = iter(comm.unpack(buffer[offset:], scalars, None) if scalars else [])
    values = [next(shaped_values) if len(sp.shape) > 0 else next(scalar_values) for sp in specs]
    return unflatten(layout, values)


# -- full-size state in one process ---------------------------------------------------------------
def _held_shape(shape: Sequence[int], index: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    return tuple(len(i) if i is not None else size for size, i in zip(shape, index))


def _greater(a: Any, b: Any) -> bool:
    try:
        return bool(a > b)
    except (TypeError, RuntimeError):
        return False


class FullState:
    """Full-size per-parameter optimizer state, cut and written back like the parameters.

    Args:
        shapes: full shape of every captured tensor that may have state
            (``ist.plan.state_shapes``).
        device: where the full-size tensors live (default: where the first
            written-back slice is).

    Tensors shaped like their (sliced) parameter follow the parameter;
    scalars are kept as the maximum over subnets; anything else is not
    carried and named in :attr:`dropped`.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], device: torch.device | str | None = None) -> None:
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.device = torch.device(device) if device is not None else None
        self.full: dict[str, dict[str, torch.Tensor]] = {}  # name -> key -> full-size tensor
        self.scalars: dict[str, dict[str, Any]] = {}  # name -> key -> maximum over subnets
        self.dropped: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.full or self.scalars)

    @property
    def nbytes(self) -> int:
        """Bytes of the full-size tensors held."""
        return sum(t.numel() * t.element_size() for entry in self.full.values() for t in entry.values())

    def for_subnet(self, slices: RoundSlices, subnet: int, names: Iterable[str] | None = None) -> StateDict:
        """The slice of the state subnet `subnet` holds in the round of `slices` (new tensors, never views).

        `names` limits it to the tensors the subnet trains (default: all).
        """
        wanted = set(self.full) | set(self.scalars)
        if names is not None:
            wanted &= set(names)
        out: StateDict = {}
        for name in sorted(wanted):
            entry: dict[str, Any] = {}
            for key, full in self.full.get(name, {}).items():
                entry[key] = slices.take(name, full, subnet)
            for key, value in self.scalars.get(name, {}).items():
                entry[key] = value.clone() if isinstance(value, torch.Tensor) else value
            out[name] = entry
        return out

    def write_back(self, slices: RoundSlices, states: Sequence[tuple[int, StateDict, float]]) -> None:
        """Write subnets' trained state back: `states` holds (subnet, state, weight).

        Elements one subnet held are copied; elements several held (shared
        parameters, overlapping policies) are averaged with the weights, as
        the parameters are.
        """
        parts: dict[tuple[str, str], list[tuple[int, torch.Tensor, float]]] = {}
        for subnet, state, weight in states:
            for name, entry in (state or {}).items():
                if name not in self.shapes:
                    continue
                held = _held_shape(self.shapes[name], slices.indices[subnet][name])
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and tuple(value.shape) == held and len(held) > 0:
                        parts.setdefault((name, key), []).append((subnet, value.detach(), weight))
                    elif not isinstance(value, torch.Tensor) or value.numel() == 1:
                        scalars = self.scalars.setdefault(name, {})
                        old = scalars.get(key)
                        if old is None or _greater(value, old):
                            scalars[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
                    else:
                        self.dropped.add(f"{name}[{key!r}]")
        with torch.no_grad():
            for (name, key), values in parts.items():
                entries = self.full.setdefault(name, {})
                if key not in entries:
                    device = self.device if self.device is not None else values[0][1].device
                    entries[key] = torch.zeros(self.shapes[name], dtype=values[0][1].dtype, device=device)
                full = entries[key]
                slices.put(name, full, [(s, v.to(full.device), w) for s, v, w in values])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"name::key": tensor}`` for a checkpoint (scalars as 0-d tensors)."""
        out = {f"{n}::{k}": t for n, entry in self.full.items() for k, t in entry.items()}
        for n, entry in self.scalars.items():
            for k, v in entry.items():
                out[f"{n}::{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.full.clear()
        self.scalars.clear()
        for flat, value in tensors.items():
            name, _, key = flat.rpartition("::")
            if value.dim() > 0:
                self.full.setdefault(name, {})[key] = value.clone()
            else:
                self.scalars.setdefault(name, {})[key] = value.clone()


# -- the slices one rank holds (sharded) ----------------------------------------------------------
class HeldState:
    """The optimizer state of the slices one rank holds, keyed like :class:`FullState`.

    Under the sharded topology no rank holds the full state: each rank keeps
    the state of the slices it trained last (:meth:`keep`), the backend moves
    those tensors with their units, and the next trainer starts from them.
    ``tensors[name][key]`` is shaped like the rank's slice of ``name``;
    ``scalars`` are common to all ranks.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.scalars: dict[str, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.tensors or self.scalars)

    def keys(self, name: str) -> list[str]:
        """The shaped state keys of `name`, sorted."""
        return sorted(self.tensors.get(name, {}))

    def keep(self, state: StateDict, held_shapes: Mapping[str, Sequence[int]]) -> None:
        """Keep a trained subnet's state: shaped tensors per name, scalars as they are."""
        self.tensors.clear()
        for name, entry in state.items():
            shape = tuple(held_shapes.get(name, ()))
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == shape:
                    self.tensors.setdefault(name, {})[key] = value.detach()
                elif not isinstance(value, torch.Tensor) or value.numel() == 1:
                    self.scalars.setdefault(name, {})[key] = (value.detach().clone() if isinstance(value, torch.Tensor)
                                                              else value)

    def as_state(self) -> StateDict:
        """The state to :func:`attach` to this rank's next subnet."""
        out: StateDict = {}
        for name in set(self.tensors) | set(self.scalars):
            entry: dict[str, Any] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                     for k, v in self.scalars.get(name, {}).items()}
            entry.update({k: v for k, v in self.tensors.get(name, {}).items()})
            out[name] = entry
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the shaped tensors held."""
        return sum(t.numel() * t.element_size() for entry in self.tensors.values() for t in entry.values())
