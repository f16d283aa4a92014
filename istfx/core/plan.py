"""The plan: which groups are split, how units are dealt out each round.

Default: split every *exact* group with at least S units that is not a minor
factor of a viewed axis (head_dim stays whole); share everything else
(replicated in every subnet, averaged on reassembly).

Policies say how a group's units are dealt to subnets in a round:

- :class:`Disjoint` (default): a random partition; every unit in exactly one
  subnet, sizes differ by at most one unit (or follow ``sizes`` fractions).
- :class:`Overlap` ``(keep=xi)``: each subnet independently keeps a random
  ``xi`` fraction; units held by several subnets are averaged.
- :class:`Rolling`: contiguous windows that move by one unit per round
  (FedRolex); disjoint when the sizes add up to one.
- :class:`Nested`: every subnet holds the first units of each group, as many
  as its ``sizes`` fraction (HeteroFL): smaller subnets are prefixes of larger
  ones, the same every round; units held by several subnets are averaged.

Assignments come from a generator seeded by ``(seed, round, group)``, so
every process derives the same ones with no messages.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from istfx.core.analysis import Diagnostic
from istfx.core.interfaces import Block, RoleLabel
from istfx.core.groups import APPROXIMATE, EXACT, FROZEN, Group  # noqa: F401  (re-exported)
from istfx.core.report import format_plan
from istfx.errors import ISTError


@dataclass(frozen=True)
class Disjoint:
    """Each unit in exactly one subnet per round."""

    disjoint = True

    def deal(self, units: int, counts: list[int], rng: np.random.Generator, round: int) -> list[np.ndarray]:
        """Sorted unit indices per subnet: a random partition."""
        perm = rng.permutation(units)
        bounds = np.cumsum([0, *counts])
        return [np.sort(perm[a:b]) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class Overlap:
    """Each subnet keeps a random `keep` fraction of the units, independently."""

    keep: float = 0.5
    disjoint = False

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ISTError(f"overlap keep must be in (0, 1], got {self.keep}")

    def deal(self, units: int, counts: list[int], rng: np.random.Generator, round: int) -> list[np.ndarray]:
        """Sorted unit indices per subnet: independent random subsets."""
        return [np.sort(rng.permutation(units)[:c]) for c in counts]


@dataclass(frozen=True)
class Rolling:
    """Contiguous windows that roll forward by one unit every round (FedRolex)."""

    disjoint = True

    def deal(self, units: int, counts: list[int], rng: np.random.Generator, round: int) -> list[np.ndarray]:
        """Sorted unit indices per subnet: contiguous windows shifted by `round`."""
        starts = np.cumsum([0, *counts[:-1]]) + round
        return [np.sort((s + np.arange(c)) % units) for s, c in zip(starts, counts)]


@dataclass(frozen=True)
class Nested:
    """Prefixes: subnet s holds units ``0 .. counts[s] - 1`` of every group (HeteroFL's nested sub-models)."""

    disjoint = False

    def deal(self, units: int, counts: list[int], rng: np.random.Generator, round: int) -> list[np.ndarray]:
        """The first `count` units for each subnet, every round."""
        return [np.arange(c) for c in counts]


Policy = Disjoint | Overlap | Rolling | Nested


def parse_policy(policy: str | Policy) -> Policy:
    """'disjoint', 'rolling', 'nested', 'overlap' or 'overlap(0.7)' (also accepts policy objects)."""
    if isinstance(policy, (Disjoint, Overlap, Rolling, Nested)):
        return policy
    text = str(policy).strip().lower().replace(" ", "")
    if text == "disjoint":
        return Disjoint()
    if text == "rolling":
        return Rolling()
    if text == "nested":
        return Nested()
    if text.startswith("overlap"):
        inner = text[len("overlap"):].strip("()").replace("keep=", "")
        try:
            return Overlap(float(inner)) if inner else Overlap()
        except ValueError as exc:
            raise ISTError(f"overlap policy {policy!r}: {exc}") from exc
    raise ISTError(f"unknown policy {policy!r}: use 'disjoint', 'overlap(keep)', 'rolling' or 'nested'")


@dataclass
class Plan:
    """What is split, what is shared, and how units are dealt out each round."""

    subnets: int
    groups: list[Group]
    split: list[int]  # ids of the split groups
    policy: Policy
    seed: int
    sizes: tuple[float, ...] | None
    state_kinds: dict[str, str]
    state_shapes: dict[str, tuple[int, ...]]
    diagnostics: list[Diagnostic] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # exact groups kept whole, and why
    token: str = ""
    parameters_full: int = 0
    parameters_per_subnet: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)  # droppable residual blocks dealt out
    shared_blocks: list[Block] = field(default_factory=list)  # residual blocks found but kept in every subnet
    min_depth: int | None = None
    depth_scaling: str = "eval"
    specialized: list[str] = field(default_factory=list)  # input dims captured static, and why
    roles: dict[int, RoleLabel] = field(default_factory=dict)  # group id -> role, from the describing pass

    # -- depth -----------------------------------------------------------------
    def block_assignment(self, round: int) -> list[list[int]]:
        """Indices into `blocks` that each subnet keeps in `round` (all others are skipped)."""
        if not self.blocks:
            return [[] for _ in range(self.subnets)]
        rng = np.random.default_rng([self.seed, round, len(self.groups) + 1_000_003])
        return deal_blocks(len(self.blocks), self.subnets, self.min_depth, rng)

    @property
    def keep_probability(self) -> float:
        """p: the average fraction of subnets holding each droppable block per round."""
        return keep_probability(len(self.blocks), self.subnets, self.min_depth)

    # -- assignment ----------------------------------------------------------
    def counts(self, group: Group) -> list[int]:
        """Units of `group` each subnet holds (the same every round)."""
        return unit_counts(group.units, self.subnets, self.sizes, self.policy)

    def assignment(self, round: int) -> dict[int, list[torch.Tensor]]:
        """group id -> the sorted unit indices each subnet holds in `round`."""
        out = {}
        for gid in self.split:
            group = self.groups[gid]
            rng = np.random.default_rng([self.seed, round, gid])
            parts = self.policy.deal(group.units, self.counts(group), rng, round)
            out[gid] = [torch.as_tensor(p, dtype=torch.long) for p in parts]
        return out

    # -- reporting -------------------------------------------------------------
    def to_dict(self) -> dict:
        """The plan as plain data (what `istfx inspect --json` prints)."""
        return {
            "subnets": self.subnets,
            "policy": type(self.policy).__name__.lower()
            + (f"({self.policy.keep})" if isinstance(self.policy, Overlap) else ""),
            "seed": self.seed,
            "sizes": list(self.sizes) if self.sizes else None,
            "groups": [
                {
                    "id": g.id,
                    "units": g.units,
                    "status": g.status,
                    "split": g.id in self.split,
                    "units_per_subnet": self.counts(g) if g.id in self.split else None,
                    "role": self.roles[g.id].name if g.id in self.roles else None,
                    "reasons": g.reasons,
                    "kept_whole": self.skipped.get(g.id),
                    "inner": g.inner,
                    "members": [
                        {"tensor": m.tensor, "dim": m.dim, "offset": m.offset, "length": m.length,
                         "unit": m.unit}
                        for m in g.members
                    ],
                }
                for g in self.groups
            ],
            "parameters_full": self.parameters_full,
            "parameters_per_subnet": list(self.parameters_per_subnet),
            "blocks": [
                {"module": b.module, "parameters": b.parameters, "droppable": True} for b in self.blocks
            ] + [
                {"module": b.module, "parameters": b.parameters, "droppable": False,
                 "reason": b.reason or "not selected by blocks="}
                for b in self.shared_blocks
            ],
            "min_depth": self.min_depth,
            "depth_scaling": self.depth_scaling if self.blocks else None,
            "block_keep_probability": self.keep_probability if self.blocks else None,
            "specialized": list(self.specialized),
            "diagnostics": [
                {"op": d.op, "node": d.node, "source": d.source, "message": d.message} for d in self.diagnostics
            ],
        }

    def to_json(self) -> str:
        """The plan as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        return format_plan(self)


def deal_blocks(n_blocks: int, subnets: int, min_depth: int | None, rng: np.random.Generator) -> list[list[int]]:
    """Blocks each subnet keeps this round: a random partition, topped up to `min_depth`.

    Without `min_depth` every block is in exactly one subnet (shares differ by
    at most one). With it, a subnet holding fewer than `min_depth` blocks
    borrows random others, so blocks overlap and are averaged on reassembly.
    """
    perm = [int(i) for i in rng.permutation(n_blocks)]
    base, extra = divmod(n_blocks, subnets)
    held, start = [], 0
    for s in range(subnets):
        size = base + (1 if s < extra else 0)
        held.append(sorted(perm[start:start + size]))
        start += size
    if min_depth:
        for s in range(subnets):
            others = [b for b in (int(i) for i in rng.permutation(n_blocks)) if b not in held[s]]
            held[s] = sorted(held[s] + others[: max(0, min_depth - len(held[s]))])
    return held


def keep_probability(n_blocks: int, subnets: int, min_depth: int | None) -> float:
    """The fraction of subnets that hold a block in a round, on average (ResIST's p)."""
    base = n_blocks / subnets
    per_subnet = max(base, min_depth or 0) if min_depth else base
    return min(1.0, per_subnet / n_blocks) if n_blocks else 1.0


def unit_counts(units: int, subnets: int, sizes: Sequence[float] | None, policy: Policy) -> list[int]:
    """How many units each subnet holds: near-equal shares, or `sizes` fractions.

    Every subnet holds at least one unit. Disjoint policies never hand out
    more than `units` in all; fractions are apportioned by largest remainder,
    so each count is within one unit of its share and a larger fraction
    never gets fewer units.
    """
    if sizes is None:
        if isinstance(policy, Nested):
            raise ISTError("the nested policy needs sizes, one fraction per subnet (e.g. sizes=[1, 0.5, 0.25, 0.25]):"
                           " subnet s holds the first sizes[s] of every split group's units")
        if isinstance(policy, Overlap):
            return [max(1, round(policy.keep * units))] * subnets
        base, extra = divmod(units, subnets)
        return [base + (1 if s < extra else 0) for s in range(subnets)]
    if not policy.disjoint:
        return [min(units, max(1, round(f * units))) for f in sizes]
    shares = [f * units for f in sizes]
    total = max(subnets, min(units, round(sum(shares))))
    counts = [min(int(x), units) for x in shares]
    by_remainder = sorted(range(subnets), key=lambda s: (shares[s] - counts[s], sizes[s], -s), reverse=True)
    for k in range(max(0, total - sum(counts))):
        counts[by_remainder[k % subnets]] += 1
    for s in range(subnets):  # every subnet holds a unit: take it from the largest holder
        if counts[s] == 0:
            donor = max(range(subnets), key=lambda t: (counts[t], -sizes[t]))
            counts[donor] -= 1
            counts[s] = 1
    return counts


__all__ = ["Plan", "Disjoint", "Overlap", "Rolling", "Nested", "parse_policy", "unit_counts", "deal_blocks", "keep_probability",
           "EXACT", "APPROXIMATE", "FROZEN"]
