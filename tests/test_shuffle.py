"""Channel shuffle of concatenated branches (ShuffleNetV2), split exactly.

``channel_shuffle(cat(x1, branch(x2)), 2)`` views the k equal pieces of a
concatenation as the product ``[k, C/k]`` and transposes it. The pieces are
then one axis (unit i of every piece is cut together) under a frozen piece
selector, so the shuffle stays a permutation of the held channels; the next
unit's ``chunk(2)`` halves the shuffled axis, which refines it further. The
stream channels split (before: frozen, "both a concat and a product") and
every subnet equals the masked model (float64, outputs and one SGD step, in
training and evaluation mode). Pieces of different sizes stay frozen with
their reason.
"""
from __future__ import annotations

import pytest
import torch
from conftest import check_coverage, check_forward_equivalence, check_interface, check_round_trip, check_sgd_step
from torch import nn

import istfx
from istfx.core.axes import PIECES


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNet channel shuffle."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _branch(cin: int, hidden: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden), nn.BatchNorm2d(hidden),
                         nn.Conv2d(hidden, cout, 1), nn.ReLU(inplace=True))


class DownUnit(nn.Module):
    """ShuffleNetV2's stride-2 unit: two branches of the same input, concatenated and shuffled."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1, groups=cin), nn.Conv2d(cin, cout // 2, 1), nn.ReLU())
        self.right = _branch(cin, cout // 2, cout // 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat((self.left(x), self.right(x)), 1), 2)


class Unit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass, half go through a branch; then a shuffle."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.branch = _branch(channels // 2, hidden, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)


def _stage(units: int = 2, channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    body = [DownUnit(4, channels)] + [Unit(channels, 6) for _ in range(units)]
    return nn.Sequential(nn.Conv2d(2, 4, 1), *body, nn.Conv2d(channels, 5, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(5, 3)).double()


def _image(batch: int = 3, side: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _stream(ist: istfx.ISTModel, tensor: str, dim: int) -> list:
    return [g for g in ist.plan.groups if any(m.tensor == tensor and m.dim == dim for m in g.members)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shufflenet_v2_stage_splits_its_stream_exactly(mode: str) -> None:
    x = _image()

    def build() -> nn.Module:
        model = _stage()
        return model.train(mode == "train")

    ist = istfx.compile(build(), subnets=2, example_inputs=(x,))
    twin = istfx.compile(build(), subnets=2, example_inputs=(x,))
    # The stream: what the shuffles carry, read by every unit's branch and the head.
    for tensor, dim in [("1.right.5.weight", 0), ("2.branch.0.weight", 1), ("3.branch.5.weight", 0),
                        ("4.weight", 1)]:
        groups = _stream(ist, tensor, dim)
        assert groups and all(g.status != "frozen" or any(r.startswith(PIECES) for r in g.reasons) for g in groups)
        assert any(g.id in ist.plan.split for g in groups), (tensor, [g.describe() for g in groups])
    assert not any("interleaved" in r for g in ist.plan.groups for r in g.reasons), str(ist.plan)
    check_round_trip(ist, 0)
    check_coverage(ist, twin)
    check_forward_equivalence(ist, ((x,), {}), 1, mode=mode)
    for s in range(2):
        check_sgd_step(ist, ((x,), {}), 2, s, mode=mode)
    check_interface(ist, [((x[:1],), {}), ((_image(4, 6, 1),), {})], mode=mode)


class UnevenShuffle(nn.Module):
    """A concatenation of pieces of different sizes (4 | 8) viewed as 3 x 4 and shuffled: no common cut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 1)  # its 6 channels split: the rest of the network still does
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 8, 1)
        self.head = nn.Conv2d(12, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(channel_shuffle(torch.cat((self.a(h), self.b(h)), 1), 3)).mean((2, 3))


def test_uneven_pieces_stay_frozen_with_their_reason() -> None:
    ist = istfx.compile(UnevenShuffle().double(), subnets=2, example_inputs=(_image(),))
    groups = _stream(ist, "b.weight", 0)
    assert groups and all(g.status == "frozen" for g in groups)
    assert any("interleaved (e.g. a channel shuffle" in r for g in groups for r in g.reasons), groups[0].reasons
    assert any(g.id in ist.plan.split for g in _stream(ist, "stem.weight", 0))


def test_a_stream_that_cannot_halve_again_is_frozen_and_subnets_still_run() -> None:
    """12 channels: pieces of 6 = 3 x 2 after the first halving; the third unit would halve 3, so the
    stream has no common factorisation there and is frozen with that reason (in every unit: one axis).
    The branches' hidden channels still split, and every subnet equals the masked model. (Before the
    flags reached every factor of an axis shared by several products, a subnet cut a factor its frozen
    parent kept whole and crashed.)"""
    x = _image()
    ist = istfx.compile(_stage(units=3, channels=12), subnets=2, example_inputs=(x,))
    stream = _stream(ist, "5.weight", 1)
    assert stream and all(g.status == "frozen" for g in stream)
    assert any("share no common factorisation" in r for g in stream for r in g.reasons), stream[0].reasons
    assert {"2.branch.0.weight", "3.branch.0.weight", "4.branch.0.weight"} <= {
        m.tensor for g in ist.plan.split for m in ist.plan.groups[g].members}
    check_forward_equivalence(ist, ((x,), {}), 1)
    check_sgd_step(ist, ((x,), {}), 1, 0)
