"""Interleaved rotary embeddings (GPT-J, CodeGen, Cohere): rules and roles.

GPT-J builds its rotary tables with ``repeat_interleave(sin, 2, dim)`` and
rotates pairs with ``x[..., ::2]`` / ``x[..., 1::2]``. Both have rules: a
repeat_interleave is a product [axis, repeats] and a strided slice over a
whole axis selects one position of its minor factor. The pairs inside a head
are ``head_dim`` (before: "query heads per KV group", which made the heads
read as KV groups), and with ``split_inner=True`` they are cut exactly
(the rotary table is sliced with them). Float64, dropout 0.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import check_coverage, check_forward_equivalence, check_interface, check_round_trip, check_sgd_step
from torch import nn

import istfx
from istfx.passes import describe

VOCAB = 61
_LM = dict(vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


BUILD = {
    "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
        **_LM, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)),
    "codegen": lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(
        **_LM, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64, n_positions=64, n_ctx=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(
        **_LM, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64)),
}
HEADS = {"gptj": "4 heads", "codegen": "4 heads", "cohere": "4 KV groups of 2 query heads"}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILD[name]().double()


def _compile(name: str, **kw) -> istfx.ISTModel:
    return istfx.compile(_build(name), subnets=2, example_inputs=((), {"input_ids": _ids()}), **kw)


@pytest.mark.parametrize("name", sorted(BUILD))
def test_interleaved_rotary_has_rules_and_heads_read_as_heads(name: str) -> None:
    ist = _compile(name)
    assert not [d for d in ist.plan.diagnostics if "repeat_interleave" in d.op], ist.plan.diagnostics
    labels = describe(ist)
    heads = [labels[g.id].detail for g in ist.plan.groups if labels[g.id].name == "heads"]
    assert heads == [HEADS[name]] * 2, heads
    assert all(g.id in ist.plan.split for g in ist.plan.groups if labels[g.id].name == "heads")
    pairs = [g for g in ist.plan.groups if labels[g.id].name == "head_dim" and "rotary pairs" in labels[g.id].detail]
    assert pairs and all(g.status == "exact" for g in pairs), [labels[g.id] for g in ist.plan.groups]
    if name != "cohere":  # Cohere's query heads inside a KV group are the one heads_in_group
        assert "heads_in_group" not in {r.name for r in labels.values()}


@pytest.mark.parametrize("name", ["gptj", "cohere"])
def test_rotary_pairs_split_exactly_with_split_inner(name: str) -> None:
    """Cutting the pairs inside each head (and the heads) equals the masked model, the rotary table sliced
    with the pairs (a buffer in GPT-J, computed from ``inv_freq`` in Cohere)."""
    ist, twin = _compile(name, split_inner=True), _compile(name, split_inner=True)
    labels = describe(ist)
    pairs = [g.id for g in ist.plan.groups if "rotary pairs" in labels[g.id].detail]
    assert pairs and set(pairs) <= set(ist.plan.split), str(ist.plan)
    inputs = ((), {"input_ids": _ids(3, 6, 1)})
    check_round_trip(ist, 0)
    check_coverage(ist, twin)
    for mode in ("train", "eval"):
        check_forward_equivalence(ist, inputs, 1, key="logits", mode=mode)
        for s in range(2):
            check_sgd_step(ist, inputs, 2, s, loss_fn=lambda out: out.pow(2).mean(), key="logits", mode=mode)
        check_interface(ist, [((), {"input_ids": _ids(1, 5, 2)})], mode=mode)
