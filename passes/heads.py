"""The heads pass: what each coupled-axis group is, read off the axis algebra.

No config attribute or module name is consulted. A projection whose output
axis is viewed as ``units x inner`` gives groups whose members hold a *unit*
of several contiguous elements (a head of ``head_dim`` rows) and an inner
factor; that is all this pass looks at:

``heads``
    not a minor factor, and at least two tensors hold it with unit > 1 (the
    q/k/v projections and the output projection's columns): whole attention
    heads. When a ``heads_in_group`` factor sits inside it (the queries of
    grouped-query attention), its units are whole KV groups.
``heads_in_group``
    a minor factor with unit > 1 on two dimensions: the query heads inside
    one KV group.
``head_dim``
    a minor factor with unit 1 (with rotary embeddings, the two halves of
    head_dim are one axis of half the size).
``d_model``
    normalised or reduced over (LayerNorm/RMSNorm) and held by several
    tensors: the residual stream.
``ffn`` / ``neurons`` / ``channels``
    unit-1 hidden axes produced by one parameter and read by another: FFN
    units in a model with heads (experts' hidden units included), conv
    channels when a member is a conv kernel's channel axis (a grouped conv's
    units are whole groups), hidden neurons otherwise.
``spatial``
    a convolution's kernel window or spatial positions (flattened into a
    linear layer's input).
``embedding_rows``, ``io``, ``other``
    rows looked up by index; axes fixed by a model input or output; the rest
    (the q/k/v selector of a packed projection is ``other``).

``heads_in_group`` needs members on two dimensions (produced by the query
projection, read by the output projection); pieces inside a head that only
q and k produce (GPT-J's interleaved rotary pairs) are ``head_dim``.

Usage::

    from istfx.passes import roles, role_summary
    ist = istfx.compile(model, subnets=4)
    roles(ist)              # {group id: "heads" | "head_dim" | "ffn" | "d_model" | ...}
    role_summary(ist)       # per role: groups, split, units, why kept whole
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from istfx.core.axes import KERNEL_WINDOW, SELECTED, SPATIAL
from istfx.core.groups import EXACT, FROZEN, Group

HEADS, HEADS_IN_GROUP, HEAD_DIM = "heads", "heads_in_group", "head_dim"
D_MODEL, FFN, NEURONS, CHANNELS = "d_model", "ffn", "neurons", "channels"
EMBEDDING_ROWS, IO, OTHER = "embedding_rows", "io", "other"
SPATIAL_ROLE = "spatial"


@dataclass(frozen=True)
class Role:
    """A group's role and a one-line account of it (``"4 heads"``, ``"2 KV groups of 2 query heads"``)."""

    name: str
    detail: str = ""


@dataclass
class HeadsPass:
    """Label groups by role. ``flags(group) -> (frozen reasons, approximate reasons)`` sees
    both kinds of reason even for frozen groups (a frozen d_model is still normalised over)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # tensor -> "parameter" | "buffer" | "constant"
    flags: Any = None
    conv_kernels: set[str] = field(default_factory=set)  # tensors with a kernel window (found by `run`)

    def run(self, groups: list[Group]) -> dict[int, Role]:
        self.conv_kernels = {m.tensor for g in groups if any(r.startswith(KERNEL_WINDOW) for r in self._reasons(g)[0])
                             for m in g.members}
        roles = {g.id: self._role(g) for g in groups}
        has_heads = any(r.name == HEADS for r in roles.values())
        for g in groups:
            role = roles[g.id]
            if role.name == NEURONS and has_heads:  # hidden unit-1 axes are FFN units in a model with heads
                roles[g.id] = Role(FFN, role.detail)
            elif role.name == HEADS:  # query heads inside each unit: the units are KV groups
                tensors = {m.tensor for m in g.members}
                inside = [o for o in groups if roles[o.id].name == HEADS_IN_GROUP
                          and tensors & {m.tensor for m in o.members}]
                if inside:
                    per = max(inside, key=lambda o: len({m.tensor for m in o.members})).units
                    roles[g.id] = Role(HEADS, f"{g.units} KV groups of {per} query heads")
                    continue
                # A projection packed per KV group (Falcon's [q_1 .. q_r, k, v]) is taken apart piece by piece, so
                # the query heads inside a unit are a selected axis; they are the one that reaches another weight
                # (the output projection), while k and v stay inside the packed projection.
                queries = [o for o in groups if roles[o.id].name == OTHER and o.id != g.id
                           and any(r.startswith(SELECTED) for r in self._reasons(o)[0])
                           and len({m.tensor.rsplit(".", 1)[0] for m in o.members
                                    if m.unit > 1 and m.tensor in tensors}) >= 2]
                if queries:
                    roles[g.id] = Role(HEADS, f"{g.units} KV groups of {max(o.units for o in queries)} query heads")
        return roles

    def _reasons(self, g: Group) -> tuple[list[str], list[str]]:
        if self.flags is not None:
            return self.flags(g)
        return (g.reasons if g.status == FROZEN else []), (g.reasons if g.status != FROZEN else [])

    def _role(self, g: Group) -> Role:
        frozen, approximate = self._reasons(g)
        multi = [m for m in g.members if m.unit > 1]
        tensors = {m.tensor for m in g.members}
        if any(r.startswith((KERNEL_WINDOW, SPATIAL)) for r in frozen):
            return Role(SPATIAL_ROLE, f"{g.units} spatial positions (kernel window or feature map)")
        if any(r.startswith(SELECTED) for r in frozen):
            return Role(OTHER, f"{g.units} pieces selected one by one (e.g. q, k, v of a packed projection)")
        conv = [m for m in g.members if m.dim in (0, 1) and m.tensor in self.conv_kernels
                and self.kinds.get(m.tensor, "parameter") == "parameter"]
        if conv and any(r.startswith(("normalised over", "reduced over")) for r in approximate) and len(tensors) >= 2 \
                and any(m.tensor not in self.conv_kernels for m in g.members):
            return Role(D_MODEL, f"{g.units} features, normalised")  # a ViT's patch embedding feeds d_model
        if conv and any(r in ("model input", "model output") for r in frozen):
            return Role(IO, f"{g.units} (fixed by a model input or output)")
        if conv:
            per = max(m.unit for m in conv)
            if g.inner:
                return Role(CHANNELS, f"{g.units} channels inside each group of a grouped convolution")
            return Role(CHANNELS, f"{g.units} groups of {per} channels" if per > 1 else f"{g.units} channels")
        if g.inner:
            # Query heads inside a KV group are produced by one weight and read by another (the output
            # projection): two dimensions. Pieces inside a head (GPT-J's interleaved rotary pairs) only meet
            # q and k, on the dimension that produces them.
            if len({m.dim for m in multi}) >= 2:
                return Role(HEADS_IN_GROUP, f"{g.units} query heads per KV group")
            if multi:
                return Role(HEAD_DIM, f"{g.units} pieces of {max(m.unit for m in multi)} inside each head "
                                      "(e.g. interleaved rotary pairs)")
            return Role(HEAD_DIM, f"{g.units} units inside each head (or each half of it)")
        if len({m.tensor for m in multi}) >= 2:
            return Role(HEADS, f"{g.units} heads")
        if any(r.startswith(("normalised over", "reduced over")) for r in approximate) and len(tensors) >= 2:
            return Role(D_MODEL, f"{g.units} features, normalised")
        if any("looked up" in r for r in frozen):
            return Role(EMBEDDING_ROWS, f"{g.units} rows")
        if self.flags is None and any(r in ("model input", "model output") for r in frozen):
            # Without the algebra's flags a frozen group hides whether it is also normalised over.
            return Role(IO, f"{g.units} (fixed by a model input or output)")
        matrices = {m.tensor for m in g.members if len(self.shapes.get(m.tensor, ())) >= 2
                    and self.kinds.get(m.tensor, "parameter") == "parameter"}
        if not multi and len(matrices) >= 2 and g.units > 1:
            return Role(NEURONS, f"{g.units} hidden units")
        if any(r in ("model input", "model output") for r in frozen):
            return Role(IO, f"{g.units} (fixed by a model input or output)")
        return Role(OTHER, f"{g.units} units")


def describe(source: Any) -> dict[int, Role]:
    """``{group id: Role}`` for an :class:`istfx.ISTModel` (or a :class:`istfx.Plan`)."""
    plan = getattr(source, "plan", source)
    analysis = getattr(source, "analysis", None)
    flags = None
    if analysis is not None:
        alg = analysis.alg

        def flags(g: Group) -> tuple[list[str], list[str]]:
            f = alg.flags(g.atom)
            return list(f.frozen), list(f.approximate)

    return HeadsPass(dict(plan.state_shapes), dict(plan.state_kinds), flags).run(plan.groups)


def roles(source: Any) -> dict[int, str]:
    """``{group id: role name}`` for an :class:`istfx.ISTModel` or a :class:`istfx.Plan`."""
    return {gid: role.name for gid, role in describe(source).items()}


def role_summary(source: Any) -> dict[str, dict]:
    """Per role: how many groups, how many are split, units per subnet, and why others stay whole.

    ``why`` counts the reasons groups of that role are not split: the width
    pass's (``"2 units < 4 subnets ..."``) for exact groups, the analysis's
    first reason for approximate and frozen ones (an op without a rule, a
    data-dependent index...).
    """
    plan = getattr(source, "plan", source)
    out: dict[str, dict] = {}
    for gid, role in describe(source).items():
        g = plan.groups[gid]
        entry = out.setdefault(role.name, {"groups": 0, "split": 0, "units": [], "per_subnet": [],
                                           "details": [], "why": Counter()})
        entry["groups"] += 1
        entry["units"].append(g.units)
        if role.detail not in entry["details"]:
            entry["details"].append(role.detail)
        if gid in plan.split:
            entry["split"] += 1
            entry["per_subnet"].append(plan.counts(g))
        else:
            why = plan.skipped.get(gid) if g.status == EXACT else (g.reasons[0] if g.reasons else g.status)
            entry["why"][why or "not split"] += 1
    return out


__all__ = ["HeadsPass", "Role", "describe", "roles", "role_summary", "HEADS", "HEADS_IN_GROUP", "HEAD_DIM",
           "D_MODEL", "FFN", "NEURONS", "CHANNELS", "EMBEDDING_ROWS", "IO", "OTHER", "SPATIAL_ROLE"]
