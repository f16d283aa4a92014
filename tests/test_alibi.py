"""ALiBi attention (BLOOM, MPT): whole heads split, each subnet with the slopes of the heads it holds.

The slopes are built in the graph from ``arange`` over the heads (values are
positions: the subnet reads the arange sliced by its held heads) and BLOOM
tiles them over a dynamic batch (``repeat(batch, 1, 1)``, or a reshape of
``[batch, heads, L]`` to ``[batch * heads, 1, L]`` when an attention mask is
given): the heads are the minor factor, so whole tiles are cut. Mask
equivalence is checked in float64, outputs and one SGD step, in training and
evaluation mode.
"""
from __future__ import annotations


import pytest
import torch
import transformers as tf
from conftest import (
    check_coverage,
    check_forward_equivalence,
    check_interface,
    check_round_trip,
    check_sgd_step,
)
from torch import nn

import istfx
from istfx.passes import roles

F64 = torch.float64
VOCAB = 61
_LM = dict(vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _bloom() -> nn.Module:
    torch.manual_seed(0)
    config = tf.BloomConfig(**_LM, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)
    return tf.BloomForCausalLM(config).double()


def _mpt() -> nn.Module:
    torch.manual_seed(0)
    config = tf.MptConfig(**_LM, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64)
    return tf.MptForCausalLM(config).double()


def _heads(ist: istfx.ISTModel) -> list:
    labels = roles(ist)
    return [ist.plan.groups[g] for g in labels if labels[g] == "heads"]


def _check(ist: istfx.ISTModel, twin: istfx.ISTModel, inputs, variants, key: str = "logits") -> None:
    check_round_trip(ist, 0)
    check_coverage(ist, twin)
    for mode in ("train", "eval"):
        check_forward_equivalence(ist, inputs, 1, key=key, mode=mode)
        for s in range(ist.plan.subnets):
            check_sgd_step(ist, inputs, 2, s, loss_fn=lambda out: out.pow(2).mean(), key=key, mode=mode)
        check_interface(ist, variants, mode=mode)


@pytest.mark.parametrize("with_mask", [False, True])
def test_bloom_heads_split_with_their_slopes(with_mask: bool) -> None:
    """Without a mask BLOOM tiles the slopes with ``repeat(batch, 1, 1)``; with one it reshapes
    ``[batch, heads, L]`` into ``[batch * heads, 1, L]``. Both: heads split 2/2 (before: shared, "repeated
    axis"), every subnet equal to the masked model."""

    def inputs(batch: int, length: int, seed: int = 0):
        ids = _ids(batch, length, seed)
        kwargs = {"input_ids": ids}
        if with_mask:
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0  # right padding: positions (cumsum of the mask) and slopes meet it
            kwargs["attention_mask"] = mask
        return (), kwargs

    example = inputs(2, 8)
    ist = istfx.compile(_bloom(), subnets=2, example_inputs=example)
    twin = istfx.compile(_bloom(), subnets=2, example_inputs=example)
    heads = _heads(ist)
    assert [g.units for g in heads] == [4] and all(g.id in ist.plan.split for g in heads), str(ist.plan)
    held = {m.tensor for g in heads for m in g.members}
    assert {"transformer.h.0.self_attention.query_key_value.weight",
            "transformer.h.1.self_attention.dense.weight"} <= held
    _check(ist, twin, inputs(3, 6, seed=1), [inputs(1, 5, seed=2), inputs(4, 9, seed=3)])


def test_mpt_heads_split_with_their_slopes() -> None:
    """MPT builds the slopes from ``arange(1, n_heads + 1)`` (before: frozen, "values are positions")."""
    example = ((), {"input_ids": _ids()})
    ist = istfx.compile(_mpt(), subnets=2, example_inputs=example)
    twin = istfx.compile(_mpt(), subnets=2, example_inputs=example)
    heads = _heads(ist)
    assert [g.units for g in heads] == [4] and all(g.id in ist.plan.split for g in heads), str(ist.plan)
    _check(ist, twin, ((), {"input_ids": _ids(3, 6, 1)}), [((), {"input_ids": _ids(1, 5, 2)})])


@pytest.mark.parametrize("tile", [False, True])
def test_plain_alibi_attention_splits_heads(tile: bool) -> None:
    """The pattern in plain torch.nn (the generated zoo of tests/test_zoo_patterns.py draws it too): slopes
    ``2 ** (-8 * arange(1, h + 1) / h)``, BLOOM's tiled layout or MPT's broadcast one. Heads split 2/2 and
    each subnet's slopes are those of its held heads (a prefix would fail the masked-model check for
    most rounds)."""
    from test_zoo_patterns import AlibiAttention

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(AlibiAttention(16, 4, tile), nn.Linear(16, 3)).double()

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    ist = istfx.compile(build(), subnets=2, example_inputs=(x,))
    twin = istfx.compile(build(), subnets=2, example_inputs=(x,))
    heads = _heads(ist)
    assert [g.units for g in heads] == [4] and heads[0].id in ist.plan.split, str(ist.plan)
    assert not ist.plan.diagnostics
    for r in range(3):
        held = ist.plan.assignment(r)[heads[0].id]
        constant = next(n for n in ist.plan.state_kinds if "constant" in n and "arange" in n)
        for s, subnet in enumerate(ist.decompose(r)):
            assert torch.equal(subnet.get_buffer(constant) if constant in dict(subnet.named_buffers())
                               else getattr(subnet, constant), torch.arange(1, 5)[held[s]])
    y = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    check_round_trip(ist, 0)
    check_coverage(ist, twin)
    for mode in ("train", "eval"):
        check_forward_equivalence(ist, ((y,), {}), 1, mode=mode)
        check_sgd_step(ist, ((y,), {}), 2, 1, mode=mode)
        check_interface(ist, [((x[:1],), {})], mode=mode)
