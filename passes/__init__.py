"""Decomposition passes: decide what each round cuts.

- :mod:`istfx.passes.width` splits exact coupled-axis groups (neurons,
  channels, heads, FFN units, graph-conv features); ``split_approximate``
  also splits approximate ones (d_model).
- :mod:`istfx.passes.heads` labels every group's role from the axis algebra
  (attention heads or KV groups, head_dim, FFN units, d_model, ...).
- :mod:`istfx.passes.depth` finds residual blocks and deals them out (ResIST).
"""
from .heads import HeadsPass, Role, describe, role_summary, roles
from .width import WidthPass

__all__ = ["WidthPass", "HeadsPass", "Role", "describe", "roles", "role_summary"]
