"""The IST invariants (tests/conftest.py) on the Hugging Face model zoo of ``benchmarks/zoo.py``.

Each model is tiny (hidden 32, 2 layers, 4 heads or 4 KV groups, vocabulary 97), float64,
random weights, dropout 0, compiled at S = 2. Per model: attention heads and
FFN units are found (from the axis algebra) and split; (1) round trip bit
for bit; (2) coverage; (3) every subnet's outputs equal the full model's
with the other units zeroed; (4) subnets take another batch size and length.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (the test extra: the zoo is Hugging Face models)

from conftest import check_coverage, check_forward_equivalence, check_interface, check_round_trip

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("istfx_zoo", _PATH)
zoo = importlib.util.module_from_spec(_spec)
sys.modules["istfx_zoo"] = zoo
_spec.loader.exec_module(zoo)

from istfx.passes import role_summary, roles  # noqa: E402

F64 = torch.float64
SUBNETS = 2


def _inputs(name: str, batch: int = 2, length: int = 8, seed: int = 0):
    return (), zoo.inputs(name, batch, length, seed, dtype=F64)


@pytest.fixture(scope="module", params=list(zoo.ZOO))
def compiled(request):
    name = request.param
    return name, zoo.compile_entry(name, SUBNETS, dtype=F64)


def test_zoo_lists_the_required_models() -> None:
    required = {"bert", "roberta", "distilbert", "gpt2", "gpt_neo", "opt", "llama", "mistral", "qwen2", "phi3",
                "gemma", "t5", "bart", "vit"}
    assert required <= set(zoo.ZOO) and len(zoo.ZOO) > len(required)


def test_heads_and_ffn_are_found_and_split(compiled) -> None:
    name, ist = compiled
    summary = role_summary(ist)
    assert summary.get("heads", {}).get("split"), f"{name}: no attention heads split\n{ist.plan}"
    assert summary.get("ffn", {}).get("split"), f"{name}: no FFN units split\n{ist.plan}"
    assert summary["heads"]["split"] == summary["heads"]["groups"], f"{name}: some heads kept whole\n{ist.plan}"
    # d_model, the normalised residual stream, and head_dim stay whole.
    labels = roles(ist)
    for gid in ist.plan.split:
        assert labels[gid] in ("heads", "ffn"), (name, gid, labels[gid])
    assert "d_model" in summary and summary["d_model"]["split"] == 0


GQA = {"llama", "mistral", "qwen2", "phi3", "gemma", "falcon"}


def test_grouped_query_attention_units_are_kv_groups(compiled) -> None:
    from istfx.passes import describe

    name, ist = compiled
    details = {r.detail for r in describe(ist).values() if r.name == "heads"}
    if name in GQA:
        assert details == {"4 KV groups of 2 query heads"}, (name, details)
    else:
        assert all("KV" not in d for d in details), (name, details)


def test_round_trip(compiled) -> None:
    _, ist = compiled
    check_round_trip(ist, 0)
    check_round_trip(ist, 5)


def test_coverage(compiled) -> None:
    # Reproducibility in another process is tested on the families; here the partition itself.
    _, ist = compiled
    check_coverage(ist, ist, rounds=range(3))


def test_mask_equivalence(compiled) -> None:
    name, ist = compiled
    check_forward_equivalence(ist, _inputs(name), round=1)


def test_interface_other_batch_size(compiled) -> None:
    name, ist = compiled
    check_interface(ist, [_inputs(name, batch=3, length=5, seed=1), _inputs(name, batch=5, length=12, seed=2)],
                    round=2)


def test_sgd_step_equals_masked_step(compiled) -> None:
    # Last: it writes a trained subnet back into the shared compiled model.
    from conftest import check_sgd_step

    name, ist = compiled
    check_sgd_step(ist, _inputs(name, batch=3, length=6, seed=3), round=3, subnet_index=1, key=zoo.ZOO[name].key)
