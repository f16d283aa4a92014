"""The IST invariants on model families: PyG GCN / GraphSAGE and tiny HF BERT, GPT-2, LLaMA.

Every model is float64 with random weights and no dropout; subnets run in
training mode and are compared with the full model in training mode.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from conftest import (
    Inputs,
    check_coverage,
    check_forward_equivalence,
    check_interface,
    check_round_trip,
    check_sgd_step,
)
from torch import nn
from torch_geometric.nn import models as pyg_models

import istfx

POLICIES = ["disjoint", "overlap(0.5)", "rolling"]
VOCAB = 97


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Inputs]  # variant index -> (args, kwargs); 0 is the example
    key: str | None  # output field compared after an SGD step
    subnets: int = 2


# -- graphs ---------------------------------------------------------------------


def _karate() -> tuple[torch.Tensor, torch.Tensor]:
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    return data.x.double(), data.edge_index


def _random_graph(nodes: int, edges: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, features, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, nodes, (2, edges), generator=gen)
    return x, edge_index


def _graph_inputs(variant: int) -> Inputs:
    if variant == 0:
        return _karate(), {}
    nodes, edges = {1: (13, 39), 2: (51, 153), 3: (1, 3), 4: (5, 0)}[variant]
    return _random_graph(nodes, edges, 34, seed=variant), {}


def _gnn(cls_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return getattr(pyg_models, cls_name)(34, 16, num_layers=2, out_channels=4).double()

    return build


# -- transformers ------------------------------------------------------------------


def _ids(variant: int) -> dict:
    batch, length = {0: (2, 8), 1: (3, 5), 2: (4, 13), 3: (1, 8), 4: (2, 1)}[variant]
    gen = torch.Generator().manual_seed(100 + variant)
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=gen)}


def _hf_inputs(variant: int) -> Inputs:
    return (), _ids(variant)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, use_cache=False,
    )
    return tf.BertModel(config).double()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_inner=96, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return tf.GPT2LMHeadModel(config).double()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, attention_dropout=0.0, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config).double()


FAMILIES = {
    "gcn": Family("gcn", _gnn("GCN"), _graph_inputs, None),
    "graphsage": Family("graphsage", _gnn("GraphSAGE"), _graph_inputs, None),
    "bert": Family("bert", _bert, _hf_inputs, "last_hidden_state"),
    "gpt2": Family("gpt2", _gpt2, _hf_inputs, "logits"),
    "llama": Family("llama", _llama, _hf_inputs, "logits"),
}
GRAPHS = ["gcn", "graphsage"]
TRANSFORMERS = ["bert", "gpt2", "llama"]

# Where the FFN intermediate dimension lives, and the model's LayerNorm/RMSNorm weights (d_model).
FFN = {
    "bert": r"encoder\.layer\.\d+\.intermediate\.dense\.weight",
    "gpt2": r"transformer\.h\.\d+\.mlp\.c_fc\.weight",
    "llama": r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight",
}
NORMS = {
    "bert": ["embeddings.LayerNorm.weight", "encoder.layer.0.output.LayerNorm.weight"],
    "gpt2": ["transformer.ln_f.weight", "transformer.h.0.ln_1.weight"],
    "llama": ["model.norm.weight", "model.layers.0.input_layernorm.weight"],
}


def _compile(family: Family, policy: str = "disjoint", seed: int = 0, subnets: int | None = None, **options):
    args, kwargs = family.inputs(0)
    example = kwargs if not args else args
    if args and kwargs:
        example = (args, kwargs)
    return istfx.compile(family.build(), subnets=subnets or family.subnets, example_inputs=example,
                         policy=policy, seed=seed, **options)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def _split_members(ist: istfx.ISTModel) -> set[str]:
    return {m.tensor for g in ist.plan.split for m in ist.plan.groups[g].members}


# -- what is split ---------------------------------------------------------------------


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_hidden_features_are_split(name: str) -> None:
    ist = _compile(FAMILIES[name])
    members = _split_members(ist)
    assert any(re.fullmatch(r"convs\.\d+\.lin(_l|_r)?\.weight", t) for t in members), str(ist.plan)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_ffn_split_and_d_model_whole(name: str) -> None:
    ist = _compile(FAMILIES[name])
    plan = ist.plan
    members = _split_members(ist)
    assert any(re.fullmatch(FFN[name], t) for t in members), str(plan)
    # d_model (the axis of every LayerNorm/RMSNorm weight) is shared, never split.
    for norm in NORMS[name]:
        groups = [g for g in plan.groups if any(m.tensor == norm and m.dim == 0 for m in g.members)]
        assert groups, f"{norm} is in no group"
        for g in groups:
            assert g.id not in plan.split, f"{norm}'s group g{g.id} is split:\n{plan}"
    for gid in plan.split:
        tensors = {m.tensor for m in plan.groups[gid].members}
        assert not any(re.search(r"(LayerNorm|ln_|norm)\.weight$", t) for t in tensors), (gid, tensors)


# -- (1) round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_round_trip(family: Family, policy: str) -> None:
    ist = _compile(family, policy)
    check_round_trip(ist, 0)
    check_round_trip(ist, 3)


# -- (2) coverage --------------------------------------------------------------------------


def test_coverage(family: Family) -> None:
    ist = _compile(family, "disjoint", seed=7, subnets=3)
    twin = _compile(family, "disjoint", seed=7, subnets=3)
    check_coverage(ist, twin, rounds=range(4))


# -- (3) mask equivalence ----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["disjoint", "overlap(0.5)"])
def test_mask_equivalence_forward(family: Family, policy: str) -> None:
    ist = _compile(family, policy, subnets=3)
    check_forward_equivalence(ist, family.inputs(0), round=1)
    check_forward_equivalence(ist, family.inputs(1), round=2)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_mask_equivalence_split_inner(name: str) -> None:
    """With split_inner=True head_dim-like axes are cut too; whatever is split stays exact."""
    family = FAMILIES[name]
    ist = _compile(family, "disjoint", split_inner=True)
    assert any(ist.plan.groups[g].inner for g in ist.plan.split), str(ist.plan)
    check_round_trip(ist, 0)
    check_forward_equivalence(ist, family.inputs(0), round=1)
    check_sgd_step(ist, family.inputs(1), round=2, subnet_index=0, key=family.key)


def test_mask_equivalence_sgd_step(family: Family) -> None:
    ist = _compile(family, "disjoint")
    check_sgd_step(ist, family.inputs(0), round=0, subnet_index=1, key=family.key)


# -- (4) interface ---------------------------------------------------------------------------


def test_interface(family: Family) -> None:
    """Other batch sizes and sequence lengths (node and edge counts for graphs)."""
    ist = _compile(family, "disjoint", subnets=3)
    check_interface(ist, [family.inputs(v) for v in range(3)], round=1)


@pytest.mark.parametrize("variant", [3, 4], ids=["batch_of_one", "length_one"])
def test_interface_size_one(family: Family, variant: int) -> None:
    """A batch of one and a sequence of one token (one node; no edges) work as in the full model."""
    ist = _compile(family, "disjoint", subnets=2)
    check_interface(ist, [family.inputs(variant)], round=0)
