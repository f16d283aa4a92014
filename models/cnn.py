"""A small convolutional network sized for the 8x8 scikit-learn digits.

Layout::

    Conv3x3(in, w)  -> BatchNorm2d -> ReLU
    Conv3x3(w, 2w)  -> BatchNorm2d -> ReLU -> MaxPool2d(2)
    Flatten -> Linear(2w * (s/2)^2, 4w) -> ReLU -> Linear(4w, num_classes)

IST splits the convolution output channels (with their BatchNorm entries) and
the hidden units of the first linear layer; the input channels and the class
logits are shared by every subnet.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer classifier.

    Args:
        in_channels: channels of the input image.
        num_classes: number of output logits.
        width: channels of the first conv block; the second has ``2 * width``
            and the classifier's hidden layer has ``4 * width`` units.
        image_size: side length of the (square) input image; must be even.

    Shapes:
        input ``[batch, in_channels, image_size, image_size]`` ->
        output ``[batch, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise ValueError(f"image_size must be an even number >= 2, got {image_size}")
        hidden = 4 * width
        pooled = image_size // 2

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * pooled * pooled, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, C, H, W]`` images to ``[batch, num_classes]`` logits."""
        return self.classifier(self.features(x))
