"""The nested policy (HeteroFL): subnet s holds the first sizes[s] of every split group, every round."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import istfx
from istfx.core.plan import Nested, parse_policy
from istfx.errors import ISTError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _compile(sizes):
    return istfx.compile(_mlp(), subnets=len(sizes), policy="nested", sizes=sizes,
                         example_inputs=torch.randn(4, 6, dtype=torch.float64))


def test_parse_and_deal_are_prefixes_every_round() -> None:
    assert parse_policy("nested") == Nested()
    ist = _compile([1.0, 0.5, 0.25, 0.25])
    for round in (0, 1, 5):
        parts = ist.plan.assignment(round)
        [gid] = parts
        assert [p.tolist() for p in parts[gid]] == [list(range(16)), list(range(8)), list(range(4)), list(range(4))]
    assert ist.plan.to_dict()["policy"] == "nested"


def test_nested_needs_sizes() -> None:
    with pytest.raises(ISTError, match="nested policy needs sizes"):
        istfx.compile(_mlp(), subnets=2, policy="nested", example_inputs=torch.randn(4, 6, dtype=torch.float64))


def test_reassembly_averages_shared_prefixes_and_keeps_unheld_units() -> None:
    ist = _compile([0.5, 0.25])  # units 8..15 are held by no subnet
    before = {k: v.clone() for k, v in ist.model.state_dict().items()}
    subnets = ist.decompose(0)
    with torch.no_grad():
        for k, subnet in enumerate(subnets):
            for p in subnet.parameters():
                p.add_(k + 1.0)  # subnet 0 adds 1, subnet 1 adds 2
    ist.reassemble(subnets)
    after = ist.model.state_dict()
    w1, w1_before = after["0.weight"], before["0.weight"]
    assert torch.equal(w1[:4], w1_before[:4] + 1.5)  # held by both: the average of +1 and +2
    assert torch.equal(w1[4:8], w1_before[4:8] + 1.0)  # held by subnet 0 only
    assert torch.equal(w1[8:], w1_before[8:])  # held by nobody: unchanged
    assert dict(subnets[1].named_parameters())["0.weight"].shape == (4, 6)
