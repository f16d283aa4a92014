"""``istfx.compile``: capture, analyse, plan; then decompose and reassemble each round.

Usage::

    ist = istfx.compile(model, subnets=4)
    print(ist.plan)
    subnets = ist.decompose(round=0)       # physically smaller nn.Modules
    ...                                    # train each for a few steps
    ist.reassemble(subnets)                # written back into `model`, in place
"""
from __future__ import annotations

import contextlib
import math
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from istfx.core.analysis import AnalysisResult, AxisAnalysis
from istfx.core.capture import Captured, capture, infer_example_inputs, normalize_example_inputs
from istfx.errors import ISTError, NonFiniteUpdateError, NothingToSplitError, UnsupportedOpError
from istfx.core.groups import EXACT, build_groups
from istfx.core.plan import Plan, Policy, parse_policy
from istfx.core.slicing import RoundSlices
from istfx.core.subnet import SubnetTemplate


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
        self._fold_targets: list[str] = []
        self._finalized = False

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
        held_blocks = self.plan.block_assignment(round)
        subnets = []
        for s in range(self.plan.subnets):
            template = self.template(s, held_blocks[s])
            tensors = {name: slices.take(name, self.state_tensor(name).detach(), s)
                       for name in self.plan.state_kinds if name in template.used}
            subnet = template.instantiate(tensors, self._requires_grad)
            subnet.istfx_subnet = SubnetInfo(self.plan.token, round, s)
            subnets.append(subnet)
        self._open = (round, slices)
        return subnets

    def template(self, subnet: int, held_blocks: Sequence[int] = ()) -> SubnetTemplate:
        """The (cached) graph template for subnet slot `subnet` holding `held_blocks`."""
        sizes = tuple(self.plan.counts(self.plan.groups[g])[subnet] for g in self.plan.split)
        dropped = tuple(b for b in range(len(self.plan.blocks)) if b not in set(held_blocks))
        key = (sizes, dropped)
        if key not in self._templates:
            alg = self.analysis.alg
            kept_by_leaf = {
                alg.find(self.plan.groups[g].atom): n for g, n in zip(self.plan.split, sizes)
            }

            def new_size(atom: int) -> int:
                return alg.new_size(atom, lambda leaf: kept_by_leaf.get(alg.find(leaf), alg.size(leaf)))

            drop = [br for b in dropped for br in self.plan.blocks[b].branches]
            scale = []
            if self.plan.depth_scaling == "train":
                factor = 1.0 / self.plan.keep_probability
                scale = [(br, factor) for b in held_blocks for br in self.plan.blocks[b].branches]
            self._templates[key] = SubnetTemplate(self.captured.module, self.analysis, new_size, drop, scale)
        return self._templates[key]

    # -- depth scaling -----------------------------------------------------------
    @contextlib.contextmanager
    def inference_scaling(self) -> Iterator[nn.Module]:
        """Temporarily scale droppable branches by p in the user's model (ResIST evaluation).

        With ``depth_scaling="eval"`` each droppable block was active with
        probability p during training, so the full model runs its branches
        scaled by p; the scale is folded into the branch's last linear
        parameters and exactly restored on exit. With ``"train"`` (or no
        depth) nothing changes.
        """
        saved = self._apply_branch_scaling()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self.state_tensor(name).copy_(value)

    def finalize(self) -> nn.Module:
        """Fold the evaluation scaling into the model for good (call once, after training).

        Afterwards the user's model is ready for inference with no hand edits,
        and :meth:`inference_scaling` changes nothing more. Returns the model.
        """
        if self._finalized:
            raise ISTError("finalize() was already called: the branch scaling is in the model once.")
        self._apply_branch_scaling()
        self._finalized = True
        return self.model

    def _apply_branch_scaling(self) -> dict[str, torch.Tensor]:
        saved: dict[str, torch.Tensor] = {}
        if not self.plan.blocks or self.plan.depth_scaling != "eval" or self._finalized:
            return saved
        p = self.plan.keep_probability
        with torch.no_grad():
            for name in self._fold_targets:
                tensor = self.state_tensor(name)
                saved[name] = tensor.detach().clone()
                tensor.mul_(p)
        return saved

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
    def subnet_parameter_counts(self, round: int = 0) -> list[int]:
        """Parameters each subnet holds in `round` (the same every round without depth)."""
        slices = self.slices(round)
        held = self.plan.block_assignment(round)
        params = [n for n, k in self.plan.state_kinds.items() if k == "parameter"]
        return [
            sum(math.prod(_slice_shape(slices, n, self.plan.state_shapes[n], s))
                for n in params if n in self.template(s, held[s]).used)
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
    split_approximate: bool = False,
    blocks: str | None = None,
    min_depth: int | None = None,
    width: bool = True,
    depth_scaling: str = "eval",
    shortcut_blocks: str = "share",
    group_blocks: str | None = None,
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
        split_approximate: also cut *approximate* groups (e.g. d_model, normalised
            by LayerNorm/RMSNorm): valid narrower subnets, not mask-equivalent.
        blocks: turn on the depth pass (ResIST): a module-name glob (``"*"``,
            ``"layer3.*"``) selecting residual blocks with an identity skip to
            deal out among subnets; a subnet skips the blocks it does not hold.
        min_depth: each subnet holds at least this many blocks (blocks then
            overlap and are averaged).
        width: split neurons/channels/heads too (``False``: depth only).
        depth_scaling: ``"eval"`` (ResIST: train unscaled, scale branches by p
            for evaluation; see :meth:`ISTModel.inference_scaling` and
            :meth:`ISTModel.finalize`) or ``"train"`` (kept branches scaled
            by 1/p while training, so the model needs no scaling afterwards), or
            ``"none"`` (no scaling; for ablations).
        shortcut_blocks: ``"share"`` (default: strided/projection blocks are
            kept in every subnet and averaged) or ``"drop"`` (dealt out like
            the others, keeping their shortcut path; ResIST's naive variant).
        group_blocks: a module glob (``"model.layers.*"``) whose matches are the
            droppable units: every residual branch inside one match is dropped
            together (by default a unit is the module holding one branch).

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

    split, skipped = WidthPass(subnets, split_inner, split_approximate).run(groups) if width else ([], {})
    selected, shared_blocks, folds = _plan_depth(captured, blocks, min_depth, depth_scaling, shortcut_blocks,
                                                 group_blocks)
    if selected and len(selected) < subnets and not min_depth:
        warnings.warn(
            f"istfx: {len(selected)} residual blocks dealt out among {subnets} subnets: {subnets - len(selected)} "
            "subnets hold none each round and train only the shared layers. Pass min_depth=1 (blocks then "
            "overlap) or fewer subnets.", UserWarning, stacklevel=2)
    if not split and not width and not selected:
        raise ISTError("width=False and no blocks= given: nothing would be split. Pass blocks='*' for depth.")
    state_kinds = {n: t.kind for n, t in analysis.state.items()}
    plan = Plan(
        subnets=subnets, groups=groups, split=split, policy=policy, seed=int(seed), sizes=sizes,
        state_kinds=state_kinds, state_shapes={n: t.shape for n, t in analysis.state.items()},
        diagnostics=list(analysis.diagnostics), skipped=skipped, token=uuid.uuid4().hex,
        blocks=selected, shared_blocks=shared_blocks, min_depth=min_depth, depth_scaling=depth_scaling,
    )
    ist = ISTModel(model, plan, captured, analysis)
    ist._fold_targets = folds
    plan.parameters_per_subnet = ist.subnet_parameter_counts()
    plan.parameters_full = sum(math.prod(s) for n, s in plan.state_shapes.items() if state_kinds[n] == "parameter")
    # The plan exists even when nothing splits: the error carries it, so callers can show why.
    if not split and not selected:
        exact = [g for g in groups if g.status == EXACT]
        if not exact:
            reasons = sorted({r for g in groups for r in g.reasons})[:6]
            raise NothingToSplitError(
                f"nothing in {type(model).__name__} can be split: every axis is frozen or approximate "
                f"({'; '.join(reasons)}).",
                plan,
                "print(error.plan) or `istfx inspect` shows every group and why.",
            )
        largest = max(g.units for g in exact)
        raise NothingToSplitError(
            f"subnets={subnets} is larger than every splittable group of {type(model).__name__} "
            f"(the largest has {largest} units): use subnets <= {largest}.",
            plan,
        )
    return ist


def _plan_depth(captured: Captured, pattern: str | None, min_depth: int | None, scaling: str, shortcut_blocks: str,
                group: str | None = None):
    """(blocks dealt out, blocks kept in every subnet, parameters that fold the eval scaling)."""
    if scaling not in ("eval", "train", "none"):
        raise ISTError(f"depth_scaling must be 'eval', 'train' or 'none', got {scaling!r}.")
    if shortcut_blocks not in ("share", "drop"):
        raise ISTError(f"shortcut_blocks must be 'share' or 'drop', got {shortcut_blocks!r}.")
    if pattern is None:
        if min_depth is not None:
            raise ISTError("min_depth needs the depth pass: pass blocks='*' (or a module glob) as well.")
        return [], [], []
    from istfx.passes.depth import find_residual_blocks, fold_targets, group_blocks, select_blocks

    found, shortcuts = find_residual_blocks(captured.module)
    if group is not None:
        found = group_blocks(found, group)
    droppable = [b for b in found if b.droppable]
    if not droppable:
        raise ISTError(
            "blocks= asks for depth, but the model has no residual block with an identity skip "
            "(an add of a tensor and a branch computed from it). Compile without blocks= for width only."
        )
    selected = select_blocks(found, pattern, shortcuts if shortcut_blocks == "drop" else [])
    if not selected:
        names = ", ".join(b.module for b in droppable[:12])
        raise ISTError(f"blocks={pattern!r} matches no droppable residual block; they are: {names}.")
    if min_depth is not None and not 1 <= min_depth <= len(selected):
        raise ISTError(f"min_depth={min_depth} must be between 1 and the {len(selected)} droppable blocks selected.")
    shared = [b for b in found + shortcuts if b not in selected]
    folds: list[str] = []
    if scaling == "eval":
        for block in selected:
            for branch in block.branches:
                targets = fold_targets(captured.module, branch)
                if targets is None:
                    raise ISTError(
                        f"block {block.module}: its branch does not end in a linear op whose parameters can "
                        "carry the evaluation scale; compile with depth_scaling='train'."
                    )
                folds.extend(t for t in targets if t not in folds)
    return selected, shared, folds


__all__ = ["compile", "ISTModel", "SubnetInfo", "ReassembleReport"]
