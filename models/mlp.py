"""The fully connected network from the Independent Subnet Training paper.

Each hidden layer is ``Linear(bias=False) -> BatchNorm1d -> ReLU``. IST splits
the *hidden neurons*: every worker receives a disjoint subset of the neurons of
each hidden layer, i.e. the matching rows of that layer's weight, the matching
BatchNorm scale/shift entries, and the matching columns of the next layer's
weight. Input features and output classes are never split.

BatchNorm keeps no running statistics (``track_running_stats=False``), so a
subnet normalises with the statistics of the batch it sees and there is no
buffer state to partition or merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ISTMLP(nn.Module):
    """Multi-layer perceptron with BatchNorm, as trained with IST.

    Args:
        in_features: size of each input vector.
        hidden: width of the single hidden layer, or one width per hidden layer.
        num_classes: number of output logits.
        logit_norm: if True, apply a non-affine BatchNorm to the logits
            (the IST paper normalises the output layer as well).

    Shapes:
        input ``[batch, in_features]`` -> output ``[batch, num_classes]``.
        Because BatchNorm uses batch statistics, the batch must hold at least
        two samples in training mode.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int | Sequence[int],
        num_classes: int,
        *,
        logit_norm: bool = False,
    ) -> None:
        super().__init__()
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths:
            raise ValueError("ISTMLP needs at least one hidden layer")
        if in_features <= 0 or num_classes <= 0 or any(w <= 0 for w in widths):
            raise ValueError("all layer sizes must be positive")

        self.in_features = in_features
        self.hidden = tuple(widths)
        self.num_classes = num_classes

        # Hidden blocks: the neurons of each block are what IST splits.
        blocks: list[nn.Module] = []
        prev = in_features
        for width in widths:
            blocks.append(nn.Linear(prev, width, bias=False))
            blocks.append(nn.BatchNorm1d(width, track_running_stats=False))
            blocks.append(nn.ReLU())
            prev = width
        self.layers = nn.Sequential(*blocks)

        # Output layer: shared by every subnet, never split.
        self.head = nn.Linear(prev, num_classes, bias=False)
        self.logit_norm: nn.Module = (
            nn.BatchNorm1d(num_classes, affine=False, track_running_stats=False)
            if logit_norm
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, in_features]`` inputs to ``[batch, num_classes]`` logits."""
        x = self.layers(x)
        x = self.head(x)
        return self.logit_norm(x)
