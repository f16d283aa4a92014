"""The compiler core: capture, axis algebra, op rules, analysis, groups, plan, subnet templates, slicing, compile.

Nothing here imports a pass, a backend, the runtime or the CLI: passes are handed to
:func:`istfx.core.compiler.compile`, and everything above builds on this package.
"""
