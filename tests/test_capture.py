"""Capture: which input dims are dynamic, one export, what is specialised, clear shape errors.

Models rebuild the patterns that need static dims in plain torch: a
Swin-style network (shifted-window attention: symbolic image sides make
torch.export take minutes), an AlexNet-style CNN on 64 px images (adaptive
pooling of a small feature map: the all-dynamic export fails), and a
recurrence written as a Python loop over the sequence (export fixes the
sequence length although it was asked to keep it dynamic).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import check_forward_equivalence, check_interface, check_round_trip
from torch import nn

import istfx

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "capture_time.py"
_spec = importlib.util.spec_from_file_location("istfx_capture_time", _PATH)
capture_time = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = capture_time
_spec.loader.exec_module(capture_time)


class AlexNetish(nn.Module):
    """AlexNet's layout (stride-4 stem, three max pools, adaptive 6x6 pool, dropout classifier)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 24, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(32 * 36, 64), nn.ReLU(inplace=True),
                                        nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class LoopRNN(nn.Module):
    """A recurrence as a Python loop over the sequence (as Mamba's CPU path): export fixes the length."""

    def __init__(self, vocab: int = 17, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.cell = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        h = torch.zeros_like(x[:, 0])
        for t in range(input_ids.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], -1)))
        return self.head(h)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()


@pytest.fixture
def exports(monkeypatch) -> list[dict]:
    """Records every torch.export.export call istfx makes."""
    calls: list[dict] = []
    original = torch.export.export

    def counted(*args, **kwargs):
        calls.append(kwargs.get("dynamic_shapes"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def test_one_export_and_batch_dynamic(exports) -> None:
    ist = istfx.compile(_mlp(), subnets=2, example_inputs=(torch.randn(4, 5, dtype=torch.float64),))
    assert len(exports) == 1
    assert ist.plan.specialized == []
    check_interface(ist, [((torch.randn(b, 5, dtype=torch.float64),), {}) for b in (1, 3, 9)])


def test_swin_like_image_sides_are_static_and_listed(exports) -> None:
    torch.manual_seed(0)
    model = capture_time.SwinLike().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ist = istfx.compile(model, subnets=2, example_inputs=(x,))
    assert len(exports) == 1
    assert exports[0]["x"] == {0: torch.export.Dim.AUTO}  # batch only: the sides are never symbolic
    assert [line.split(":")[0] for line in ist.plan.specialized] == ["x dim 2 = 32", "x dim 3 = 32"]
    assert "static input dims" in str(ist.plan) and "x dim 2 = 32: image side" in str(ist.plan)
    assert ist.plan.to_dict()["specialized"] == ist.plan.specialized
    check_round_trip(ist, 0)
    check_forward_equivalence(ist, ((torch.randn(3, 3, 32, 32, dtype=torch.float64),), {}), 0, atol=1e-9)
    subnet = ist.decompose(1)[0]
    with pytest.raises(istfx.ISTError, match=r"input x has shape \(2, 3, 40, 40\), expected \(batch, 3, 32, 32\)"):
        subnet(torch.randn(2, 3, 40, 40, dtype=torch.float64))


def test_small_images_capture_with_static_sides() -> None:
    """AlexNet's layout at 64 px: with symbolic sides torch.export fails; the default keeps them static."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    ist = istfx.compile(AlexNetish(), subnets=2, example_inputs=(x,))
    assert ist.plan.split
    assert len(ist.plan.specialized) == 2
    for subnet in ist.decompose(0):
        assert subnet(torch.randn(5, 3, 64, 64)).shape == (5, 10)
    ist.reassemble(ist.decompose(1))


def test_python_loop_over_the_sequence_is_reported_and_named_in_errors() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 17, (3, 8))
    ist = istfx.compile(LoopRNN(), subnets=2, example_inputs=(ids,))
    assert any(line.startswith("input_ids dim 1 = 8: torch.export fixed it") for line in ist.plan.specialized), \
        ist.plan.specialized
    assert "input_ids dim 1 = 8" in str(ist.plan)
    subnet = ist.decompose(0)[0]
    assert subnet(torch.randint(0, 17, (5, 8))).shape == (5, 17)  # the batch stays dynamic
    with pytest.raises(istfx.ISTError, match=r"input input_ids has shape \(3, 12\), expected \(batch, 8\) "
                                             r"\(dim 1 must be 8\)"):
        subnet(torch.randint(0, 17, (3, 12)))


def test_wrong_input_width_names_the_expected_shape() -> None:
    ist = istfx.compile(_mlp(), subnets=2, example_inputs=(torch.randn(4, 5, dtype=torch.float64),))
    for module in (*ist.decompose(0), ist.captured.module):
        with pytest.raises(istfx.ISTError, match=r"input 0 has shape \(4, 7\)|input input has shape \(4, 7\), "
                                                 r"expected \(batch, 5\) \(dim 1 must be 5\)"):
            module(torch.randn(4, 7, dtype=torch.float64))
        with pytest.raises(istfx.ISTError, match=r"expected \(batch, 5\) \(2 dims, not 3\)"):
            module(torch.randn(4, 5, 1, dtype=torch.float64))


def test_dynamic_option(exports) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 17, (3, 8))

    class Tokens(nn.Module):  # batch and sequence both free
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(17, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.embed(input_ids)).mean(1)

    auto = istfx.compile(Tokens(), subnets=2, example_inputs=(ids,))
    assert exports[-1] == {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    assert auto.plan.specialized == []
    assert auto.decompose(0)[0](torch.randint(0, 17, (2, 11))).shape == (2, 8)

    batch = istfx.compile(Tokens(), subnets=2, example_inputs=(ids,), dynamic="batch")
    assert batch.plan.specialized == ["input_ids dim 1 = 8: static (dynamic='batch')"]
    with pytest.raises(istfx.ISTError, match=r"expected \(batch, 8\)"):
        batch.decompose(0)[0](torch.randint(0, 17, (2, 11)))

    static = istfx.compile(Tokens(), subnets=2, example_inputs=(ids,), dynamic=False)
    assert exports[-1] == {"input_ids": None}
    with pytest.raises(istfx.ISTError, match=r"expected \(3, 8\)"):
        static.decompose(0)[0](torch.randint(0, 17, (2, 8)))

    named = istfx.compile(Tokens(), subnets=2, example_inputs=(ids,), dynamic={"input_ids": (1,)})
    assert exports[-1] == {"input_ids": {1: torch.export.Dim.AUTO}}
    assert named.decompose(0)[0](torch.randint(0, 17, (3, 5))).shape == (3, 8)

    with pytest.raises(istfx.ISTError, match="dynamic must be 'auto', 'all', 'batch', False"):
        istfx.compile(Tokens(), subnets=2, example_inputs=(ids,), dynamic="sometimes")
    with pytest.raises(istfx.ISTError, match=r"dynamic names \['x'\], which are not tensor inputs"):
        istfx.compile(Tokens(), subnets=2, example_inputs=(ids,), dynamic={"x": (0,)})
    with pytest.raises(istfx.ISTError, match=r"dynamic\['input_ids'\] names dims \[2\]"):
        istfx.compile(Tokens(), subnets=2, example_inputs=(ids,), dynamic={"input_ids": (0, 2)})
