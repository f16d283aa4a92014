"""Decomposition passes: decide what each round cuts.

- :mod:`istfx.passes.width` splits exact coupled-axis groups (neurons,
  channels, heads, FFN units, graph-conv features); ``split_approximate``
  also splits approximate ones (d_model).
- :mod:`istfx.passes.heads` labels every group's role from the axis algebra
  (attention heads or KV groups, head_dim, FFN units, d_model, ...).
- :mod:`istfx.passes.depth` finds residual blocks to deal out (ResIST) and
  the parameters that carry their evaluation scale.

Each pass implements a protocol of :mod:`istfx.core.interfaces` and is handed to
:func:`istfx.core.compiler.compile`; ``istfx.compile`` (:mod:`istfx.api`)
chooses these defaults. The core never imports this package.
"""
from .depth import DepthPass
from .heads import HeadsPass, Role, describe, role_summary, roles
from .width import WidthPass

__all__ = ["WidthPass", "DepthPass", "HeadsPass", "Role", "describe", "roles", "role_summary"]
