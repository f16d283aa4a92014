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
    """``istfx.compile`` found nothing to split into subnets; ``plan`` shows every group and why."""

    def __init__(self, message: str, plan=None) -> None:
        super().__init__(message)
        self.plan = plan
