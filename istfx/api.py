"""``istfx.compile``: the compiler core wired with the default passes.

The core (:func:`istfx.core.compiler.compile`) takes its passes as
arguments and imports none; this module chooses them from the options a user
gives: :class:`~istfx.passes.WidthPass` for width, :class:`~istfx.passes.DepthPass`
when ``blocks=`` asks for depth, and the heads pass's
:func:`~istfx.passes.describe` for the roles in the plan's table.

Usage::

    ist = istfx.compile(model, subnets=4)
    print(ist.plan)
    subnets = ist.decompose(round=0)       # physically smaller nn.Modules
    ...                                    # train each for a few steps
    ist.reassemble(subnets)                # written back into `model`, in place
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from istfx.core import compiler
from istfx.core.compiler import ISTModel
from istfx.core.plan import Policy
from istfx.passes import DepthPass, WidthPass, describe
from istfx.passes.depth import check_shortcut_blocks


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
    dynamic: Any = "auto",
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
        dynamic: which input dims subnets accept at any size. ``"auto"``
            (default): the batch and every other dim the model accepts at
            another size, except image sides (static: symbolic image sides
            make torch.export slow or fail); falls back to the batch only, then
            to static, when export fails. ``"all"``: image sides too;
            ``"batch"``: dim 0 only; ``False``: none; or ``{input name: (dims,)}``.
            What is static is listed in ``plan.specialized``.

    Returns:
        An :class:`ISTModel`; ``print(ist.plan)`` shows the decomposition.
    """
    check_shortcut_blocks(shortcut_blocks)
    width_pass = WidthPass(subnets, split_inner, split_approximate) if width else None
    depth_pass = DepthPass(blocks, shortcut_blocks, group_blocks) if blocks is not None else None
    return compiler.compile(
        model, subnets, example_inputs=example_inputs, policy=policy, sizes=sizes, seed=seed, strict=strict,
        width=width_pass, depth=depth_pass, describe=describe, min_depth=min_depth, depth_scaling=depth_scaling,
        dynamic=dynamic,
    )


__all__ = ["compile"]
