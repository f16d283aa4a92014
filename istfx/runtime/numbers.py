"""Checks of numeric settings (learning rates, timeouts, ...): finite, in range, or an ISTError saying so.

Imports nothing heavy, so the command line checks its flags with the same
rules before torch is loaded. ::

    from istfx.runtime.numbers import finite
    lr = finite("lr", lr, above=0.0)          # nan, inf, 0 and -1 raise ISTError
    timeout = finite("timeout", timeout, above=0.0)
"""
from __future__ import annotations

import math
from typing import Any

from istfx.errors import ISTError

__all__ = ["finite"]


def finite(label: str, value: Any, *, minimum: float | None = None, above: float | None = None) -> float:
    """`value` as a float, or ISTError when it is not a finite number ``>= minimum`` (``> above``)."""
    bound = f" > {above:g}" if above is not None else f" >= {minimum:g}" if minimum is not None else ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ISTError(f"{label} must be a finite number{bound}, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(number) or \
            (minimum is not None and number < minimum) or (above is not None and number <= above):
        raise ISTError(f"{label} must be a finite number{bound}, got {value!r}.")
    return number
