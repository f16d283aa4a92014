"""Resident memory of this process (Linux ``/proc``), reported per rank in every round's metrics.

Usage::

    from istfx.backends.memory import peak_rss_mb, reset_peak_rss, rss_mb

    reset_peak_rss()          # start counting the peak from now (where allowed)
    ...
    rss_mb(), peak_rss_mb()   # MiB, or None where /proc is not available
"""
from __future__ import annotations

__all__ = ["peak_rss_mb", "reset_peak_rss", "rss_mb"]


def _status_kb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (None where it cannot be read)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (since start or the last :func:`reset_peak_rss`), MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-memory count (Linux ``/proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
