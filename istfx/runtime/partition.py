"""Per-client data partitions for federated runs: IID shares and Dirichlet(alpha) label skew.

Usage::

    parts = dirichlet_label_partition(labels, clients=16, alpha=0.5, seed=0)
    parts[3]   # sorted sample indices of client 3

Every sample goes to exactly one client. With ``alpha=None`` (IID) the
samples are shuffled and dealt evenly; with a finite ``alpha`` each class is
split among the clients by proportions drawn from Dirichlet(alpha) (small
alpha: each client sees few classes). The result depends only on the
arguments, so every process derives the same partition.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from istfx.errors import ISTError

__all__ = ["dirichlet_label_partition"]


def dirichlet_label_partition(labels: Sequence[int] | np.ndarray, clients: int, alpha: float | None,
                              seed: int = 0, min_samples: int = 1) -> list[np.ndarray]:
    """Split sample indices among `clients` by a Dirichlet(`alpha`) draw per class (``None``: IID).

    Args:
        labels: one integer class label per sample (a list, array or 1-D tensor).
        clients: number of clients (>= 1).
        alpha: Dirichlet concentration (> 0); ``None`` deals the samples evenly at random.
        seed: seed of the draw.
        min_samples: every client gets at least this many samples; draws are
            repeated (up to 100 times) until it holds.

    Returns:
        ``clients`` sorted int64 index arrays that together cover every sample once.

    Raises:
        ISTError: bad arguments, or no draw gave every client `min_samples`
            samples (use a larger alpha or fewer clients).
    """
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ISTError(f"labels must be a non-empty 1-D sequence of integer classes, got shape {labels.shape} "
                       f"of {labels.dtype}.")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ISTError(f"clients must be an int >= 1, got {clients!r}.")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
        raise ISTError(f"alpha must be a finite number > 0 (or None for IID), got {alpha!r}.")
    if labels.size < clients * min_samples:
        raise ISTError(f"{labels.size} samples cannot give {clients} clients {min_samples} sample(s) each.")
    rng = np.random.default_rng(seed)
    if alpha is None:
        order = rng.permutation(labels.size)
        return [np.sort(order[c::clients]).astype(np.int64) for c in range(clients)]
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for c, piece in enumerate(np.split(members, cuts)):
                parts[c].append(piece)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(p.size for p in out) >= min_samples:
            return out
    raise ISTError(f"no Dirichlet({alpha}) draw gave each of {clients} clients {min_samples} sample(s) in 100 "
                   "tries: use a larger alpha or fewer clients.")
