"""Subnets in evaluation mode: ``subnet.eval()`` means what ``model.eval()`` means.

Dropout turns off, batch norm uses (and leaves alone) its running statistics,
``num_batches_tracked`` stops counting; a model whose Python code branches on
``self.training`` some other way is found at compile time and its subnets
refuse evaluation mode instead of running the training branch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import check_forward_equivalence, check_interface, check_sgd_step, masked_model
from torch import nn

import istfx


def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.3),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(5)
    return model


def _x(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_eval_subnets_use_running_statistics_and_no_dropout() -> None:
    ist = istfx.compile(_bn_dropout_net(), subnets=2, example_inputs=(_x(),))
    assert ist.captured.eval_refusal is None
    check_forward_equivalence(ist, ((_x(5, 1),), {}), round=1, mode="eval")
    check_sgd_step(ist, ((_x(5, 2),), {}), round=2, subnet_index=1, mode="eval")
    check_interface(ist, [((_x(b, b),), {}) for b in (2, 7)], round=0, mode="eval")
    subnet = ist.decompose(3)[0].eval()
    before = {k: v.clone() for k, v in subnet.named_buffers()}
    first, second = subnet(_x()), subnet(_x())
    assert torch.equal(first, second)  # no dropout
    assert all(torch.equal(v, before[k]) for k, v in subnet.named_buffers())  # counters and statistics untouched


def test_train_subnets_still_train_and_running_statistics_reassemble() -> None:
    ist = istfx.compile(_bn_dropout_net(), subnets=2, example_inputs=(_x(),))
    subnets = ist.decompose(0)
    slices = ist.slices(0)
    subnet = subnets[0]
    assert subnet.training
    torch.manual_seed(3)
    a = subnet(_x())
    torch.manual_seed(4)
    b = subnet(_x())
    assert not torch.equal(a, b)  # dropout is on while training
    state = dict(subnet.named_buffers())
    assert int(state["1.num_batches_tracked"]) == 7
    # The subnet's running statistics equal the masked model's after the same training-mode batches.
    full = masked_model(ist, slices, 0, "train")
    full(_x())
    full(_x())
    expected = slices.take("1.running_mean", full.get_buffer("1.running_mean"), 0)
    assert torch.allclose(state["1.running_mean"], expected, atol=1e-12)
    before = ist.model.get_buffer("1.running_mean").clone()
    ist.reassemble(subnets)
    now = ist.model.get_buffer("1.running_mean")
    assert torch.equal(slices.take("1.running_mean", now, 0), state["1.running_mean"])
    assert not torch.equal(now, before)
    assert int(ist.model.get_buffer("1.num_batches_tracked")) == 7


class BranchOnTraining(nn.Module):
    """Python-level ``if self.training``: capture resolves it, so no graph rewrite can switch it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.training:
            h = h * 0.5 + 1.0
        return self.fc2(h)


class FunctionalDropout(nn.Module):
    """``F.dropout(training=self.training)``: the flag reaches the op, which the rewrite switches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.4, training=self.training))


def test_python_training_branch_is_refused_in_eval_mode() -> None:
    model = BranchOnTraining().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    ist = istfx.compile(model, subnets=2, example_inputs=(x,))
    assert "output 0 differs in evaluation mode" in ist.captured.eval_refusal
    subnet = ist.decompose(0)[0]
    subnet(x)  # training mode works
    check_forward_equivalence(ist, ((x,), {}), round=0, mode="train")
    with pytest.raises(istfx.ISTError, match="cannot run in evaluation mode: output 0 differs"):
        subnet.eval()(x)
    assert model.training  # the check left the user's model in its mode


def test_functional_dropout_follows_the_flag() -> None:
    torch.manual_seed(0)
    ist = istfx.compile(FunctionalDropout().double(), subnets=2,
                        example_inputs=(torch.randn(4, 4, dtype=torch.float64),))
    assert ist.captured.eval_refusal is None
    check_forward_equivalence(ist, ((torch.randn(6, 4, dtype=torch.float64),), {}), round=0, mode="eval")


def test_frozen_batch_norm_in_a_training_subnet() -> None:
    """A submodule's own flag counts (fine-tuning with batch norm frozen: bn.eval() inside train())."""
    ist = istfx.compile(_bn_dropout_net(), subnets=2, example_inputs=(_x(),))
    subnet = ist.decompose(0)[0]
    subnet.get_submodule("1").eval()
    before = subnet.get_buffer("1.running_mean").clone()
    subnet(_x())
    assert torch.equal(subnet.get_buffer("1.running_mean"), before)
    assert not torch.equal(subnet.get_buffer("6.running_mean"), ist.slices(0).take(
        "6.running_mean", ist.model.get_buffer("6.running_mean"), 0))


class DropoutAttention(nn.Module):
    """Attention as Hugging Face writes it: ``dropout_p=p if self.training else 0.0``."""

    def __init__(self, width: int = 16, heads: int = 4, p: float = 0.3) -> None:
        super().__init__()
        self.heads, self.p = heads, p
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def test_attention_dropout_follows_the_flag() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ist = istfx.compile(DropoutAttention().double(), subnets=2, example_inputs=(x,))
    assert ist.captured.eval_refusal is None
    assert ist.plan.split
    check_forward_equivalence(ist, ((torch.randn(3, 7, 16, dtype=torch.float64),), {}), round=0, mode="eval")
    subnet = ist.decompose(1)[0]
    torch.manual_seed(1)
    a = subnet(x)
    torch.manual_seed(2)
    assert not torch.equal(a, subnet(x))  # attention dropout while training
