"""Transformers under IST: heads and FFN units, KV groups, layers, and what stays whole.

- ``istfx.models.GPT`` compiles with whole heads (fused q|k|v) and MLP units
  split, and its subnets are mask-equivalent (outputs and one SGD step).
- Layer-wise depth on GPT and LLaMA: whole layers dealt out, dropped from the
  subnets' graphs; a subnet equals the full model with the layers it does
  not hold zeroed (and, combined with heads+FFN, the other units too).
- Grouped-query attention: the units dealt out are whole KV groups.
- Fewer heads (KV groups) than subnets: kept whole in every subnet, with the
  reason in the plan; attention through an op without a rule: heads shared,
  a diagnostic names the op.
- ``split_approximate=True`` cuts d_model: narrower valid subnets.

Everything is float64 with dropout 0.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import istfx
from conftest import (
    assert_close,
    check_coverage,
    check_forward_equivalence,
    check_interface,
    check_round_trip,
    check_sgd_step,
    masked_model,
    model_tensor,
    snapshot,
    assert_bitwise_equal,
)
from istfx.models import GPT, GPTConfig
from istfx.models.gpt import lm_loss
from istfx.passes import describe, role_summary, roles
from istfx.passes.depth import fold_targets

F64 = torch.float64
VOCAB = 61


def _gpt(n_layer: int = 2, n_head: int = 4, n_embd: int = 32, bias: bool = True) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias))
    return model.double()


def _ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _llama(heads: int = 4, kv_heads: int = 2, hidden: int = 32, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        attention_dropout=0.0, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config).double()


def _hf(seed: int = 0, batch: int = 2, length: int = 8):
    return (), {"input_ids": _ids(batch, length, seed)}


# -- GPT: heads + FFN -------------------------------------------------------------------


def test_gpt_forward_and_loss() -> None:
    model = _gpt()
    logits = model(_ids(3, 11))
    assert logits.shape == (3, 11, VOCAB)
    assert model.wte.weight is model.lm_head.weight  # tied
    loss = lm_loss(logits, _ids(3, 11, seed=1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = model.generate(_ids(1, 3), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8)


def test_gpt_heads_and_ffn_split_whole_heads() -> None:
    model = _gpt(n_head=4, n_embd=32)
    ist = istfx.compile(model, subnets=2, example_inputs=(_ids(),))
    labels = describe(ist)
    summary = role_summary(ist)
    assert summary["heads"]["split"] == 2 and summary["heads"]["units"] == [4, 4]
    assert summary["ffn"]["split"] == 2 and summary["ffn"]["units"] == [128, 128]
    assert summary["d_model"]["split"] == 0 and summary["head_dim"]["split"] == 0
    assert {labels[g].name for g in ist.plan.split} == {"heads", "ffn"}
    # One heads group per layer, living in the fused c_attn as q | k | v segments of whole heads of 8 rows,
    # and in the columns of the attention's output projection.
    heads = next(ist.plan.groups[g] for g in ist.plan.split if labels[g].name == "heads")
    segments = sorted((m.offset, m.length, m.unit) for m in heads.members if m.tensor == "blocks.0.attn.c_attn.weight")
    assert segments == [(0, 32, 8), (32, 32, 8), (64, 32, 8)]
    assert any(m.tensor == "blocks.0.attn.c_proj.weight" and m.dim == 1 for m in heads.members)
    # Each subnet holds whole heads: its c_attn rows come in runs of 8 aligned to head boundaries.
    slices = ist.slices(0)
    for s in range(2):
        rows = slices.indices[s]["blocks.0.attn.c_attn.weight"][0]
        assert len(rows) == 3 * 16
        assert all(rows[i] % 8 == 0 and torch.equal(rows[i:i + 8], rows[i] + torch.arange(8))
                   for i in range(0, len(rows), 8))
    subnets = ist.decompose(0)
    assert subnets[0].get_parameter("blocks.0.attn.c_attn.weight").shape == (48, 32)
    assert subnets[0].get_parameter("blocks.0.mlp.c_fc.weight").shape == (64, 32)
    ist.reassemble(subnets)


@pytest.mark.parametrize("subnets", [2, 4])
def test_gpt_mask_equivalence(subnets: int) -> None:
    ist = istfx.compile(_gpt(), subnets=subnets, example_inputs=(_ids(),))
    check_round_trip(ist, 0)
    check_coverage(ist, istfx.compile(_gpt(), subnets=subnets, example_inputs=(_ids(),)), rounds=range(3))
    check_forward_equivalence(ist, ((_ids(3, 7, seed=1),), {}), round=1)
    check_interface(ist, [((_ids(5, 13, seed=2),), {}), ((_ids(1, 4, seed=3),), {})], round=2)
    check_sgd_step(ist, ((_ids(4, 9, seed=4),), {}), round=3, subnet_index=subnets - 1)


# -- depth: whole layers ------------------------------------------------------------------


def _zero_dropped_blocks(ist: istfx.ISTModel, model: nn.Module, held: list[int]) -> None:
    """In `model` (a copy of ist.model), zero the last linear of every branch of blocks not in `held`."""
    with torch.no_grad():
        for b, block in enumerate(ist.plan.blocks):
            if b in held:
                continue
            for branch in block.branches:
                for name in fold_targets(ist.captured.module, branch):
                    model_tensor(ist, model, name).zero_()


def _check_depth_equivalence(ist: istfx.ISTModel, inputs, round: int) -> None:
    """A subnet equals the full model with dropped layers (and units it does not hold) zeroed."""
    slices = ist.slices(round)
    held = ist.plan.block_assignment(round)
    subnets = ist.decompose(round)
    args, kwargs = inputs
    for s, subnet in enumerate(subnets):
        reference = masked_model(ist, slices, s) if ist.plan.split else copy.deepcopy(ist.model).train()
        _zero_dropped_blocks(ist, reference, held[s])
        expected = reference(*args, **kwargs)
        actual = subnet(*args, **kwargs)
        expected = getattr(expected, "logits", expected)
        actual = getattr(actual, "logits", actual)
        assert_close(actual, expected, f"subnet {s} (holds blocks {held[s]})")
    ist.reassemble(subnets)


LAYERS = {"gpt": ("blocks.*", r"blocks\.(\d+)\."), "llama": ("model.layers.*", r"model\.layers\.(\d+)\.")}


def _build(kind: str, layers: int) -> tuple[nn.Module, object]:
    if kind == "gpt":
        return _gpt(n_layer=layers), ((_ids(),), {})
    return _llama(layers=layers), _hf()


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_layerwise_depth_drops_whole_layers(kind: str) -> None:
    model, (args, kwargs) = _build(kind, layers=4)
    pattern, layer_re = LAYERS[kind]
    ist = istfx.compile(model, subnets=2, example_inputs=kwargs or args, blocks=pattern, width=False)
    plan = ist.plan
    assert [b.module for b in plan.blocks] == [pattern.replace("*", str(i)) for i in range(4)]
    assert all(len(b.branches) == 2 for b in plan.blocks)  # attention and MLP: one droppable layer
    assert plan.split == []
    # Embeddings, final norm and head stay in every subnet.
    check_round_trip(ist, 0)
    check_round_trip(ist, 1)
    for r in range(3):
        held = plan.block_assignment(r)
        assert sorted(b for h in held for b in h) == [0, 1, 2, 3]  # each layer in exactly one subnet
        subnets = ist.decompose(r)
        for s, subnet in enumerate(subnets):
            layers = {int(m.group(1)) for n, _ in subnet.named_parameters() if (m := re.match(layer_re, n))}
            assert layers == set(held[s]), (r, s, layers, held[s])
            assert sum(p.numel() for p in subnet.parameters()) < sum(p.numel() for p in model.parameters())
        ist.reassemble(subnets)
    _check_depth_equivalence(ist, (args, kwargs), round=1)
    check_interface(ist, [((_ids(3, 5, seed=1),), {}) if kind == "gpt" else _hf(1, 3, 5)], round=2)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_heads_ffn_and_layers_combined(kind: str) -> None:
    model, (args, kwargs) = _build(kind, layers=4)
    pattern, _ = LAYERS[kind]
    ist = istfx.compile(model, subnets=2, example_inputs=kwargs or args, blocks=pattern)
    labels = roles(ist)
    assert {labels[g] for g in ist.plan.split} == {"heads", "ffn"}
    assert len(ist.plan.blocks) == 4
    full = ist.plan.parameters_full
    width_only = max(istfx.compile(_build(kind, 4)[0], subnets=2, example_inputs=kwargs or args)
                     .plan.parameters_per_subnet)
    assert max(ist.plan.parameters_per_subnet) < width_only < full
    check_round_trip(ist, 0)
    _check_depth_equivalence(ist, (args, kwargs), round=2)


def test_depth_eval_scaling_is_restored() -> None:
    model = _gpt(n_layer=4)
    ist = istfx.compile(model, subnets=2, example_inputs=(_ids(),), blocks="blocks.*")
    before = snapshot(model)
    with ist.inference_scaling():
        scaled = model.blocks[0].attn.c_proj.weight.detach().clone()
    assert torch.allclose(scaled, before["blocks.0.attn.c_proj.weight"] * ist.plan.keep_probability)
    assert_bitwise_equal(before, snapshot(model), "after inference_scaling")


# -- grouped-query attention ----------------------------------------------------------------


def test_gqa_units_are_whole_kv_groups() -> None:
    model = _llama(heads=8, kv_heads=4, hidden=32)  # head_dim 4, 2 query heads per KV group
    ist = istfx.compile(model, subnets=2, example_inputs=_hf()[1])
    labels = describe(ist)
    heads = [ist.plan.groups[g] for g in ist.plan.split if labels[g].name == "heads"]
    assert len(heads) == 2 and all(g.units == 4 for g in heads)
    assert labels[heads[0].id].detail == "4 KV groups of 2 query heads"
    units = {m.tensor.rsplit(".", 2)[-2]: m.unit for m in heads[0].members if m.dim == 0}
    assert units == {"q_proj": 8, "k_proj": 4, "v_proj": 4}
    slices = ist.slices(1)
    for s in range(2):
        q = slices.indices[s]["model.layers.0.self_attn.q_proj.weight"][0]
        k = slices.indices[s]["model.layers.0.self_attn.k_proj.weight"][0]
        o = slices.indices[s]["model.layers.0.self_attn.o_proj.weight"][1]
        groups = sorted({int(i) // 4 for i in k})
        assert len(groups) == 2 and len(k) == 8
        # The query heads of exactly those KV groups, whole, and the matching output-projection columns.
        expected_q = torch.cat([torch.arange(g * 8, g * 8 + 8) for g in groups])
        assert torch.equal(q, expected_q) and torch.equal(o, expected_q)
    check_forward_equivalence(ist, _hf(1, 3, 6), round=1)


def test_fewer_kv_groups_than_subnets_are_shared_with_the_reason() -> None:
    model = _llama(heads=4, kv_heads=2)
    ist = istfx.compile(model, subnets=4, example_inputs=_hf()[1])
    summary = role_summary(ist)
    assert summary["heads"]["split"] == 0 and summary["ffn"]["split"] == 2
    assert summary["heads"]["why"] == {
        "2 units < 4 subnets (kept whole: dealing them out would leave a subnet with none)": 2}
    text = str(ist.plan)
    assert "2 units < 4 subnets" in text
    heads_gid = next(g for g, r in roles(ist).items() if r == "heads")
    assert ist.plan.skipped[heads_gid].startswith("2 units < 4 subnets")
    # Every subnet keeps every head: q/k/v/o whole; only the FFN is cut.
    for subnet in ist.decompose(0):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.0.self_attn.{proj}.weight"
            assert subnet.get_parameter(name).shape == model.get_parameter(name).shape
        assert subnet.get_parameter("model.layers.0.mlp.up_proj.weight").shape == (16, 32)
    check_forward_equivalence(ist, _hf(2), round=0)


def test_fewer_heads_than_subnets_gpt() -> None:
    ist = istfx.compile(_gpt(n_head=2), subnets=4, example_inputs=(_ids(),))
    heads = [g for g, r in roles(ist).items() if r == "heads"]
    assert heads and not set(heads) & set(ist.plan.split)
    assert "2 units < 4 subnets" in str(ist.plan)
    assert all(n > 0 for n in ist.plan.parameters_per_subnet)


# -- attention the rules cannot prove ------------------------------------------------------


@torch.library.custom_op("istfx_test::mix_heads", mutates_args=())
def mix_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, T, D]: mixes heads (istfx has no axis rule for it)."""
    return x + x.mean(dim=1, keepdim=True)


@mix_heads.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class OpaqueAttention(nn.Module):
    """Multi-head self-attention whose queries pass through an op without an axis rule."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = mix_heads(q)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(y)
        return x + self.ffn(x)


def test_attention_without_a_rule_keeps_heads_with_a_diagnostic() -> None:
    torch.manual_seed(0)
    model = OpaqueAttention().double()
    x = torch.randn(2, 5, 16, dtype=F64)
    ist = istfx.compile(model, subnets=2, example_inputs=(x,))
    labels = roles(ist)
    heads = [g for g, r in labels.items() if r == "heads"]
    assert heads, str(ist.plan)
    for gid in heads:
        group = ist.plan.groups[gid]
        assert gid not in ist.plan.split and group.status == "frozen"
        assert any("istfx_test.mix_heads" in r for r in group.reasons), group.reasons
    assert [d.op for d in ist.plan.diagnostics] == ["istfx_test.mix_heads"]
    assert "test_transformers.py" in ist.plan.diagnostics[0].source
    text = str(ist.plan)
    assert "istfx_test.mix_heads" in text and "no axis rule" in text
    assert role_summary(ist)["ffn"]["split"] == 1  # the rest of the model is still split
    check_forward_equivalence(ist, ((torch.randn(3, 4, 16, dtype=F64),), {}), round=0)
    with pytest.raises(istfx.UnsupportedOpError, match="istfx_test.mix_heads"):
        istfx.compile(OpaqueAttention(), subnets=2, example_inputs=(x.float(),), strict=True)


# -- approximate splitting (d_model) --------------------------------------------------------


def test_split_approximate_cuts_d_model() -> None:
    model = _gpt(n_embd=32)
    default = istfx.compile(model, subnets=2, example_inputs=(_ids(),))
    ist = istfx.compile(model, subnets=2, example_inputs=(_ids(),), split_approximate=True)
    labels = roles(ist)
    assert "d_model" not in {labels[g] for g in default.plan.split}
    assert {labels[g] for g in ist.plan.split} >= {"heads", "ffn", "d_model"}
    assert "head_dim" not in {labels[g] for g in ist.plan.split}  # minor factors still need split_inner
    assert max(ist.plan.parameters_per_subnet) < max(default.plan.parameters_per_subnet)
    check_round_trip(ist, 0)
    check_coverage(ist, ist, rounds=range(2))
    check_interface(ist, [((_ids(3, 5),), {})], round=1)
    subnets = ist.decompose(0)
    assert subnets[0].get_parameter("ln_f.weight").shape == (16,)
    assert subnets[0].get_parameter("lm_head.weight").shape == (VOCAB, 16)
    # A narrower valid model that trains: one SGD step lowers its loss on the batch.
    x, y = _ids(4, 9, seed=5), _ids(4, 9, seed=6)
    sub = subnets[1]
    opt = torch.optim.SGD(sub.parameters(), lr=0.5)
    before = lm_loss(sub(x), y)
    before.backward()
    opt.step()
    assert lm_loss(sub(x), y) < before
    ist.reassemble(subnets)


def test_split_approximate_llama_rmsnorm() -> None:
    model = _llama()
    ist = istfx.compile(model, subnets=2, example_inputs=_hf()[1], split_approximate=True)
    assert "d_model" in {roles(ist)[g] for g in ist.plan.split}
    check_round_trip(ist, 0)
    check_interface(ist, [_hf(1, 3, 5)], round=1)
    assert ist.decompose(0)[0].get_parameter("model.norm.weight").shape == (16,)


# -- roles outside attention ----------------------------------------------------------------


def test_roles_of_mlp_and_cnn() -> None:
    from istfx.models import ISTMLP, SmallCNN

    mlp = istfx.compile(ISTMLP(8, [16, 12], 3).double(), subnets=2,
                        example_inputs=(torch.randn(4, 8, dtype=F64),))
    assert {roles(mlp)[g] for g in mlp.plan.split} == {"neurons"}
    cnn = istfx.compile(SmallCNN(width=4).double(), subnets=2, example_inputs=(torch.randn(4, 1, 8, 8, dtype=F64),))
    labels = roles(cnn)
    assert "channels" in {labels[g] for g in cnn.plan.split}
    assert "heads" not in labels.values()
    # A Plan alone (no algebra flags) gives the same labels to split groups.
    assert {g: roles(cnn.plan)[g] for g in cnn.plan.split} == {g: labels[g] for g in cnn.plan.split}
