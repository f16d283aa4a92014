"""Diagnostics name the user's line, not the library line that emitted the op."""
from __future__ import annotations

import torch
from torch import nn

import istfx
from istfx.core.analysis import source_line


class TaggedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))  # something splits
        self.lstm = nn.LSTM(6, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.pre(x))  # the user's line
        return self.head(out[:, -1])


def test_diagnostic_names_the_users_line_for_a_library_module() -> None:
    torch.manual_seed(0)
    ist = istfx.compile(TaggedLSTM(), subnets=2, example_inputs=(torch.randn(3, 5, 6),))
    lstm = [d for d in ist.plan.diagnostics if "lstm" in d.op.lower() or "rnn" in d.op.lower()]
    assert lstm, [str(d) for d in ist.plan.diagnostics]
    source = lstm[0].source
    assert "test_diagnostics_source.py" in source and "self.lstm(self.pre(x))" in source, source
    assert "(in torch/nn/modules/rnn.py:" in source, source


def test_source_line_keeps_the_innermost_user_frame() -> None:
    node = torch.fx.Graph().placeholder("x")
    node.meta["stack_trace"] = (
        '  File "/home/me/model.py", line 10, in forward\n    return self.block(x)\n'
        '  File "/home/me/blocks.py", line 4, in forward\n    return torch.kron(x, x)\n'
    )
    assert source_line(node) == "/home/me/blocks.py:4 `return torch.kron(x, x)`"
    node.meta["stack_trace"] = ""
    assert source_line(node) == ""
