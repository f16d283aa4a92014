"""``istfx.compile``: capture, analyse, plan; then decompose and reassemble each round.

Usage::

    ist = istfx.compile(model, subnets=4)
    print(ist.plan)
    subnets = ist.decompose(round=0)       # physically smaller nn.Modules
    ...                                    # train each for a few steps
    ist.reassemble(subnets)                # written back into `model`, in place
"""
from __future__ import annotations

import math
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .analysis import AnalysisResult, AxisAnalysis
from .capture import Captured, capture, infer_example_inputs, normalize_example_inputs
from .errors import ISTError, NonFiniteUpdateError, UnsupportedOpError
from .groups import EXACT, build_groups
from .plan import Plan, Policy, parse_policy
from .slicing import RoundSlices
from .subnet import SubnetTemplate


@dataclass(frozen=True)
class SubnetInfo:
    """Identifies a subnet: which compiled plan, which round, which slot."""

    token: str
    round: int
    index: int


@dataclass
class ReassembleReport:
    """What a reassembly wrote back and what it refused."""

    round: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # subnet -> reason (non-finite values)
    missing: list[int] = field(default_factory=list)  # subnets not handed back (their units keep old values)


class ISTModel:
    """A model compiled for Independent Subnet Training.

    Holds the plan and the user's model; :meth:`decompose` cuts the model into
    ``plan.subnets`` physically smaller ``GraphModule`` s for a round and
    :meth:`reassemble` writes their trained state back into the model in place.
    """

    def __init__(self, model: nn.Module, plan: Plan, captured: Captured, analysis: AnalysisResult) -> None:
        self.model = model
        self.plan = plan
        self.captured = captured
        self.analysis = analysis
        self._templates: dict[tuple[int, ...], SubnetTemplate] = {}
        self._open: tuple[int, RoundSlices] | None = None
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    # -- model state -------------------------------------------------------------
    def state_tensor(self, name: str) -> torch.Tensor:
        """The user's model tensor behind a captured parameter or buffer name."""
        kind = self.plan.state_kinds[name]
        if kind == "parameter":
            return self.model.get_parameter(name)
        if kind == "buffer":
            return self.model.get_buffer(name)
        return _get_attr(self.captured.module, name)

    @property
    def trainable_state(self) -> list[str]:
        """Names of the parameters and buffers written back on reassembly."""
        return [n for n, k in self.plan.state_kinds.items() if k != "constant"]

    # -- rounds ------------------------------------------------------------------
    def slices(self, round: int) -> RoundSlices:
        """Per-subnet indices of every parameter and buffer in `round`."""
        return RoundSlices.build(self.plan, self.analysis, self.plan.assignment(round))

    def decompose(self, round: int = 0) -> list[nn.Module]:
        """Cut the model into ``plan.subnets`` smaller modules for `round`.

        Each subnet has the model's call signature and output structure, takes
        any batch size, and owns fresh copies of its slice of every parameter
        and buffer. Subnets run in training mode (as captured).
        """
        if not isinstance(round, int) or round < 0:
            raise ISTError(f"round must be a non-negative int, got {round!r}")
        slices = self.slices(round)
        subnets = []
        for s in range(self.plan.subnets):
            tensors = {name: slices.take(name, self.state_tensor(name).detach(), s) for name in self.plan.state_kinds}
            subnet = self.template(s).instantiate(tensors, self._requires_grad)
            subnet.istfx_subnet = SubnetInfo(self.plan.token, round, s)
            subnets.append(subnet)
        self._open = (round, slices)
        return subnets

    def template(self, subnet: int) -> SubnetTemplate:
        """The (cached) graph template for subnet slot `subnet`."""
        signature = tuple(self.plan.counts(self.plan.groups[g])[subnet] for g in self.plan.split)
        if signature not in self._templates:
            alg = self.analysis.alg
            kept_by_leaf = {
                alg.find(self.plan.groups[g].atom): n for g, n in zip(self.plan.split, signature)
            }

            def new_size(atom: int) -> int:
                return alg.new_size(atom, lambda leaf: kept_by_leaf.get(alg.find(leaf), alg.size(leaf)))

            self._templates[signature] = SubnetTemplate(self.captured.module, self.analysis, new_size)
        return self._templates[signature]

    def reassemble(
        self,
        subnets: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        on_nonfinite: str = "skip",
    ) -> ReassembleReport:
        """Write trained subnets back into the model, in place.

        Split slices are copied back exactly; shared parameters (and units held
        by several subnets) are averaged, weighted by `weights` (e.g. samples
        seen; equal by default). Subnets with NaN/Inf values are left out and
        reported (``on_nonfinite="skip"``), so their units keep their previous
        values, or the call raises before touching the model
        (``on_nonfinite="raise"``). Subnets of another round or plan are
        refused and the model is left untouched.
        """
        if on_nonfinite not in ("skip", "raise"):
            raise ISTError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        round, slices = self._check_subnets(subnets, weights)
        weights = [1.0] * len(subnets) if weights is None else [float(w) for w in weights]
        report = ReassembleReport(round)
        parts_by_subnet = []
        for subnet, weight in zip(subnets, weights):
            index = subnet.istfx_subnet.index
            state = _named_state(subnet)
            bad = [n for n in self.trainable_state if n in state and not _all_finite(state[n])]
            if bad:
                reason = f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
                if on_nonfinite == "raise":
                    raise NonFiniteUpdateError(f"subnet {index} of round {round}: {reason}; the model is untouched.")
                report.rejected[index] = reason
                warnings.warn(f"istfx: subnet {index} of round {round} rejected: {reason}", RuntimeWarning,
                              stacklevel=2)
                continue
            report.accepted.append(index)
            parts_by_subnet.append((index, state, weight))
        report.missing = sorted(set(range(self.plan.subnets)) - {s.istfx_subnet.index for s in subnets})
        with torch.no_grad():
            for name in self.trainable_state:
                parts = [(i, state[name].detach(), w) for i, state, w in parts_by_subnet if name in state]
                slices.put(name, self.state_tensor(name), parts)
        self._open = None
        return report

    def _check_subnets(self, subnets: Sequence[nn.Module], weights) -> tuple[int, RoundSlices]:
        if not isinstance(subnets, (list, tuple)) or not subnets:
            raise ISTError("reassemble expects the list of subnets returned by decompose(round).")
        infos = []
        for k, subnet in enumerate(subnets):
            info = getattr(subnet, "istfx_subnet", None)
            if not isinstance(info, SubnetInfo):
                raise ISTError(f"subnets[{k}] was not made by ISTModel.decompose; the model is untouched.")
            if info.token != self.plan.token:
                raise ISTError(f"subnets[{k}] comes from another compiled plan; the model is untouched.")
            infos.append(info)
        if self._open is None:
            raise ISTError("no round is open: call decompose(round) before reassemble; the model is untouched.")
        round, slices = self._open
        stale = [i.round for i in infos if i.round != round]
        if stale:
            raise ISTError(
                f"subnets of round {stale[0]} handed back while round {round} is open; "
                "reassemble the subnets of the latest decompose. The model is untouched."
            )
        indices = [i.index for i in infos]
        if len(set(indices)) != len(indices):
            raise ISTError(f"subnet slots repeat in {indices}; the model is untouched.")
        if weights is not None and (len(weights) != len(subnets) or any(not w > 0 for w in weights)):
            raise ISTError("weights must be one positive number per subnet; the model is untouched.")
        for subnet in subnets:
            state = _named_state(subnet)
            for name in self.trainable_state:
                if name in state:
                    expected = _slice_shape(slices, name, self.state_tensor(name).shape, subnet.istfx_subnet.index)
                    if tuple(state[name].shape) != expected:
                        raise ISTError(
                            f"subnet {subnet.istfx_subnet.index}: {name} has shape {tuple(state[name].shape)}, "
                            f"expected {expected}; the model is untouched."
                        )
        return round, slices

    # -- sizes -------------------------------------------------------------------
    def subnet_parameter_counts(self) -> list[int]:
        """Parameters each subnet holds (the same every round)."""
        slices = self.slices(0)
        params = [n for n, k in self.plan.state_kinds.items() if k == "parameter"]
        return [
            sum(math.prod(_slice_shape(slices, n, self.plan.state_shapes[n], s)) for n in params)
            for s in range(self.plan.subnets)
        ]

    def __repr__(self) -> str:
        return f"ISTModel({type(self.model).__name__}, subnets={self.plan.subnets})"


def _all_finite(tensor: torch.Tensor) -> bool:
    """One pass: NaN propagates through min/max and +-inf shows in them."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _slice_shape(slices: RoundSlices, name: str, shape, subnet: int) -> tuple[int, ...]:
    return tuple(size if i is None else len(i) for size, i in zip(shape, slices.indices[subnet][name]))


def _named_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    return state


def _get_attr(obj: Any, name: str) -> Any:
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def compile(
    model: nn.Module,
    subnets: int,
    *,
    example_inputs: Any = None,
    policy: str | Policy = "disjoint",
    sizes: Sequence[float] | None = None,
    seed: int = 0,
    strict: bool = False,
    split_inner: bool = False,
) -> ISTModel:
    """Compile `model` for Independent Subnet Training with `subnets` subnets.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture.
        subnets: S, the number of independent subnets per round (>= 1).
        example_inputs: a tensor, a tuple of args, a dict of kwargs or
            ``(args, kwargs)``; inferred from HF ``dummy_inputs`` or the first
            Linear/Conv/Embedding layer when omitted. Use a batch of at least 2.
        policy: ``"disjoint"`` (default), ``"overlap(0.5)"`` or ``"rolling"``.
        sizes: per-subnet fractions of each split group (heterogeneous subnets).
        seed: seeds the per-round assignment; equal seeds give equal rounds
            in every process.
        strict: raise :class:`UnsupportedOpError` when an op has no axis rule,
            instead of freezing its axes and reporting it in ``plan.diagnostics``.
        split_inner: also cut minor factors of viewed axes (e.g. head_dim).

    Returns:
        An :class:`ISTModel`; ``print(ist.plan)`` shows the decomposition.
    """
    if not isinstance(model, nn.Module):
        raise ISTError(f"istfx.compile expects a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(subnets, bool) or not isinstance(subnets, int) or subnets < 1:
        raise ISTError(f"subnets must be an int >= 1, got {subnets!r}.")
    policy = parse_policy(policy)
    if sizes is not None:
        sizes = tuple(float(f) for f in sizes)
        if len(sizes) != subnets or any(not 0 < f <= 1 for f in sizes):
            raise ISTError(f"sizes must give {subnets} fractions in (0, 1], got {list(sizes)}.")
        if policy.disjoint and sum(sizes) > 1 + 1e-9:
            raise ISTError(f"disjoint subnets cannot hold more than all units: sizes sum to {sum(sizes):.3f} > 1.")
    if example_inputs is None:
        args, kwargs = infer_example_inputs(model)
    else:
        args, kwargs = normalize_example_inputs(example_inputs)
    captured = capture(model, args, kwargs)
    analysis = AxisAnalysis(captured.module).run()
    if strict and analysis.diagnostics:
        lines = "\n".join(f"  - {d}" for d in analysis.diagnostics)
        raise UnsupportedOpError(
            f"{len(analysis.diagnostics)} op(s) have no axis rule:\n{lines}\n"
            "Register rules with istfx.register_rule(...) or compile with strict=False to keep their axes whole."
        )
    groups = build_groups(analysis)
    from istfx.passes import WidthPass  # passes build on the core, import late

    split, skipped = WidthPass(subnets, split_inner).run(groups)
    if not split:
        exact = [g for g in groups if g.status == EXACT]
        if not exact:
            reasons = sorted({r for g in groups for r in g.reasons})[:6]
            raise ISTError(
                f"nothing in {type(model).__name__} can be split: every axis is frozen or approximate "
                f"({'; '.join(reasons)}). See istfx inspect for the full analysis."
            )
        largest = max(g.units for g in exact)
        raise ISTError(
            f"subnets={subnets} is larger than every splittable group of {type(model).__name__} "
            f"(the largest has {largest} units): use subnets <= {largest}."
        )
    state_kinds = {n: t.kind for n, t in analysis.state.items()}
    plan = Plan(
        subnets=subnets, groups=groups, split=split, policy=policy, seed=int(seed), sizes=sizes,
        state_kinds=state_kinds, state_shapes={n: t.shape for n, t in analysis.state.items()},
        diagnostics=list(analysis.diagnostics), skipped=skipped, token=uuid.uuid4().hex,
    )
    ist = ISTModel(model, plan, captured, analysis)
    plan.parameters_per_subnet = ist.subnet_parameter_counts()
    plan.parameters_full = sum(math.prod(s) for n, s in plan.state_shapes.items() if state_kinds[n] == "parameter")
    return ist


__all__ = ["compile", "ISTModel", "SubnetInfo", "ReassembleReport"]
