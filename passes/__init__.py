"""Decomposition passes: decide what each round cuts.

- :mod:`istfx.passes.width` splits exact coupled-axis groups (neurons,
  channels, heads, FFN units, graph-conv features).
"""
from .width import WidthPass

__all__ = ["WidthPass"]
