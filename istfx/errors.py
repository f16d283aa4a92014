"""Errors istfx raises. Every message says what is wrong and what to do."""
from __future__ import annotations


class ISTError(ValueError):
    """Bad input to istfx (wrong type, impossible subnet count, mismatched subnets...)."""


class CaptureError(ISTError):
    """torch.export could not capture the model; PyTorch's reason is chained."""


class UnsupportedOpError(ISTError):
    """``strict=True`` and an op without an axis rule froze part of the model."""


class NonFiniteUpdateError(ISTError):
    """A subnet came back with NaN or Inf values (raised when asked to, never silently)."""


class NothingToSplitError(ISTError):
    """``istfx.compile`` found nothing to split into subnets; ``plan`` shows every group and why.

    ``reason`` is the message without the pointer to ``plan`` (for tools that show the plan themselves).
    """

    def __init__(self, reason: str, plan=None, hint: str = "") -> None:
        super().__init__(f"{reason} {hint}".strip())
        self.reason = reason
        self.plan = plan
