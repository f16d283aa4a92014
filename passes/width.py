"""The width pass: split exact groups with enough units, share the rest.

A group is split when cutting it equals masking its units in the full model
(*exact*), it has at least one unit per subnet, and it is not a minor factor
of a viewed axis (head_dim inside heads x head_dim) unless asked for. Every
other exact group is kept whole with the reason recorded in the plan; a group
with fewer units than subnets (2 KV groups, 4 subnets) is never dealt out, so
no subnet is left with none of its units.

``split_approximate=True`` also splits *approximate* groups (e.g. d_model,
the residual stream normalised by LayerNorm/RMSNorm): each subnet is then a
valid narrower model, no longer equal to the masked full model.

Usage::

    split, kept_whole = WidthPass(subnets=4).run(groups)
"""
from __future__ import annotations

from dataclasses import dataclass

from istfx.core.groups import APPROXIMATE, EXACT, Group


@dataclass
class WidthPass:
    """Chooses the groups to split for `subnets` subnets."""
    subnets: int
    split_inner: bool = False
    split_approximate: bool = False

    def run(self, groups: list[Group]) -> tuple[list[int], dict[int, str]]:
        """Ids of the groups to split, and why each other candidate group stays whole."""
        allowed = (EXACT, APPROXIMATE) if self.split_approximate else (EXACT,)
        split, kept_whole = [], {}
        for g in groups:
            if g.status not in allowed:
                continue
            if g.units < self.subnets:
                kept_whole[g.id] = (f"{g.units} units < {self.subnets} subnets "
                                    "(kept whole: dealing them out would leave a subnet with none)")
            elif g.constants_only:
                kept_whole[g.id] = "holds no parameter or buffer, only constants the graph computes: nothing to train"
            elif g.inner and not self.split_inner:
                kept_whole[g.id] = "minor factor of a viewed axis (e.g. head_dim); split_inner=True cuts it"
            else:
                split.append(g.id)
        return split, kept_whole
