"""The width pass: split exact groups with enough units, share the rest.

A group is split when cutting it equals masking its units in the full model
(*exact*), it has at least one unit per subnet, and it is not a minor factor
of a viewed axis (head_dim inside heads x head_dim) unless asked for. Every
other exact group is kept whole with the reason recorded in the plan.

Usage::

    split, kept_whole = WidthPass(subnets=4).run(groups)
"""
from __future__ import annotations

from dataclasses import dataclass

from istfx.groups import EXACT, Group


@dataclass
class WidthPass:
    subnets: int
    split_inner: bool = False

    def run(self, groups: list[Group]) -> tuple[list[int], dict[int, str]]:
        """Ids of the groups to split, and why each other exact group stays whole."""
        split, kept_whole = [], {}
        for g in groups:
            if g.status != EXACT:
                continue
            if g.units < self.subnets:
                kept_whole[g.id] = f"{g.units} units < {self.subnets} subnets"
            elif g.inner and not self.split_inner:
                kept_whole[g.id] = "minor factor of a viewed axis (e.g. head_dim); split_inner=True cuts it"
            else:
                split.append(g.id)
        return split, kept_whole
