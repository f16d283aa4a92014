"""ResNets for CIFAR-sized images, as cut by ResIST (depth-wise IST).

Two families, one file, read top to bottom:

- :class:`PreActResNet`: pre-activation residual blocks (He et al., "Identity
  Mappings in Deep Residual Networks"): ``x + branch(x)`` with the branch
  ``BN -> ReLU -> conv -> BN -> ReLU -> conv`` and nothing after the add, so
  the skip carries ``x`` unchanged. ResIST trains these best.
- :class:`ResNet`: the original post-activation blocks, ``ReLU(x + branch(x))``
  with the branch ``conv -> BN -> ReLU -> conv -> BN``; kept for comparison.

Both use the CIFAR stem (a 3x3 convolution, no max pooling) and four sections
``layer1``..``layer4`` of ``width``, ``2 width``, ``4 width``, ``8 width``
channels (times 4 at a bottleneck's output); the first block of
``layer2``..``layer4`` halves the resolution with a strided convolution and
a strided 1x1 projection shortcut, and so does any block whose channel count
changes. Depths 18 and 34 use :class:`BasicBlock`, 50 and 101
:class:`Bottleneck`.

Which blocks a subnet may skip is found on the captured graph, not from these
names: a block whose skip is the identity is droppable; the first block of a
section (projection shortcut) is shared by every subnet. Its module path
(``layer3.1``) is what ``istfx.compile(..., blocks="layer3.*")`` matches.

Usage::

    from istfx.models import PreActResNet
    model = PreActResNet(depth=18, num_classes=10)            # 11.2M parameters
    tiny = PreActResNet(depth=18, in_channels=1, width=8)    # for tests
"""
from __future__ import annotations

import torch
from torch import nn

# depth -> (block kind, blocks per section)
_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _bn(channels: int, track_running_stats: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=track_running_stats)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int, norm: bool, track_running_stats: bool) -> nn.Module | None:
    """The strided 1x1 projection when the block changes shape (None: identity skip).

    Post-activation blocks normalise it (``norm=True``); pre-activation ones
    read an already normalised input.
    """
    if stride == 1 and c_in == c_out:
        return None
    if not norm:
        return _conv1x1(c_in, c_out, stride)
    return nn.Sequential(_conv1x1(c_in, c_out, stride), _bn(c_out, track_running_stats))


# -- pre-activation blocks ---------------------------------------------------------------


class PreActBasicBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))``; a strided 1x1 projection when the shape changes."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, track_running_stats: bool = True) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.bn1 = _bn(c_in, track_running_stats)
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn2 = _bn(planes, track_running_stats)
        self.conv2 = _conv3x3(planes, c_out)
        self.shortcut = _shortcut(c_in, c_out, stride, False, track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # The projection reads the pre-activated input, as in the paper.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return skip + out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, track_running_stats: bool = True) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.bn1 = _bn(c_in, track_running_stats)
        self.conv1 = _conv1x1(c_in, planes)
        self.bn2 = _bn(planes, track_running_stats)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = _bn(planes, track_running_stats)
        self.conv3 = _conv1x1(planes, c_out)
        self.shortcut = _shortcut(c_in, c_out, stride, False, track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return skip + out


# -- post-activation blocks --------------------------------------------------------------


class BasicBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``; projection ``bn(conv1x1(x))`` when the shape changes."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, track_running_stats: bool = True) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = _bn(planes, track_running_stats)
        self.conv2 = _conv3x3(planes, c_out)
        self.bn2 = _bn(c_out, track_running_stats)
        self.shortcut = _shortcut(c_in, c_out, stride, True, track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return torch.relu(skip + out)


class Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand by 4, ReLU after the add."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, track_running_stats: bool = True) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = _bn(planes, track_running_stats)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = _bn(planes, track_running_stats)
        self.conv3 = _conv1x1(planes, c_out)
        self.bn3 = _bn(c_out, track_running_stats)
        self.shortcut = _shortcut(c_in, c_out, stride, True, track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return torch.relu(skip + out)


# -- networks -----------------------------------------------------------------------------


def _check(depth: int, num_classes: int, in_channels: int, width: int) -> tuple[str, tuple[int, ...]]:
    if depth not in _LAYOUTS:
        raise ValueError(f"depth must be one of {sorted(_LAYOUTS)}, got {depth!r}")
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    return _LAYOUTS[depth]


def _sections(block: type[nn.Module], counts: tuple[int, ...], width: int,
              track_running_stats: bool) -> tuple[list[nn.Sequential], int]:
    """``layer1``..``layer4``; the first block of sections 2-4 has stride 2. Returns (sections, channels out)."""
    sections, c_in = [], width
    for i, count in enumerate(counts):
        planes = width * 2 ** i
        blocks = []
        for j in range(count):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(block(c_in, planes, stride, track_running_stats))
            c_in = planes * block.expansion
        sections.append(nn.Sequential(*blocks))
    return sections, c_in


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a CIFAR stem (ResIST's model).

    Args:
        depth: 18 or 34 (basic blocks), 50 or 101 (bottleneck blocks).
        num_classes: output logits.
        in_channels: channels of the input image.
        width: channels of the stem and ``layer1`` (64 in the paper; small
            values such as 8 make quick test models).
        track_running_stats: BatchNorm keeps running statistics (True) or
            always normalises with the statistics of the batch (False).

    Shapes:
        input ``[batch, in_channels, H, W]`` -> output ``[batch, num_classes]``.
        Sections 2-4 halve the resolution (32x32 reaches ``layer4`` at 4x4,
        8x8 at 1x1). In training mode BatchNorm needs more than one value per
        channel, so a batch of 1 needs ``layer4`` maps of at least 2x2
        (inputs from 16x16).
    """

    def __init__(self, depth: int = 18, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        kind, counts = _check(depth, num_classes, in_channels, width)
        block = PreActBasicBlock if kind == "basic" else PreActBottleneck
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, width)
        (self.layer1, self.layer2, self.layer3, self.layer4), c_out = _sections(
            block, counts, width, track_running_stats)
        self.bn = _bn(c_out, track_running_stats)  # the last blocks' outputs are not yet normalised
        self.fc = nn.Linear(c_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, C, H, W]`` images to ``[batch, num_classes]`` logits."""
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.relu(self.bn(out))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


class ResNet(nn.Module):
    """Post-activation ResNet with a CIFAR stem (the original residual block).

    Same arguments and shapes as :class:`PreActResNet`. The stem is
    ``conv3x3 -> BN -> ReLU``; every block ends in a ReLU after its add.
    """

    def __init__(self, depth: int = 18, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        kind, counts = _check(depth, num_classes, in_channels, width)
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = _bn(width, track_running_stats)
        (self.layer1, self.layer2, self.layer3, self.layer4), c_out = _sections(
            block, counts, width, track_running_stats)
        self.fc = nn.Linear(c_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, C, H, W]`` images to ``[batch, num_classes]`` logits."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


__all__ = ["PreActResNet", "ResNet", "PreActBasicBlock", "PreActBottleneck", "BasicBlock", "Bottleneck"]
