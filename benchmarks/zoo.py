"""istfx over whole public model zoos: every torchvision classifier and ~50 Hugging Face architectures.

    python benchmarks/zoo.py                        # both zoos, one process per model: docs/zoo.md + docs/zoo.json
    python benchmarks/zoo.py --zoo hf               # one zoo (rows merged into docs/zoo.json)
    python benchmarks/zoo.py --only resnet18 llama  # a few rows (merged into docs/zoo.json)
    python benchmarks/zoo.py --quick                # a handful of each zoo, printed, nothing written
    python benchmarks/zoo.py --render               # docs/zoo.md again from docs/zoo.json
    python benchmarks/zoo.py --families-first --merge  # one model per family first; keep rows not redone

Every model is built from its constructor or a tiny config with random
weights (no download). Each runs in its own process (``--timeout``, default
600 s, one at a time, one intra-op thread) that records, at S = 4:

- **captured**: ``istfx.compile`` succeeded (and whether a bare
  ``torch.export.export(model, args, kwargs, strict=False)`` of the same model
  and inputs did, in the same process: **compile / export** is the ratio of
  their wall times, after one warm-up export of a small module);
- **groups**: coupled-axis groups split / shared (exact but kept whole, or
  approximate) / frozen, with the most frequent reasons, and the ops without
  an axis rule (``plan.diagnostics``);
- **round trip**: decompose + reassemble, untrained, is bit exact
  (``check_round_trip`` of ``tests/conftest.py``);
- **mask equivalence**: each subnet's outputs against the full model with the
  units it does not hold zeroed (``masked_model`` of ``tests/conftest.py``),
  float64 (float32 for the few models noted), the largest absolute error, and
  whether it passes ``conftest``'s tolerance (``ATOL``/``RTOL`` in float64);
- **train / eval**: every subnet runs on another batch size (3) in training
  mode (``check_interface``) and after ``subnet.eval()`` (same output
  structure and shapes, finite values); **eval = masked** compares subnet 0
  in evaluation mode with the masked model in evaluation mode;
- **largest subnet**: the parameters of the largest subnet over the model's.

Dropout and stochastic depth are set to 0 (as the Hugging Face configs'
dropout), so that training-mode outputs are deterministic. Hugging Face rows
also show the roles (attention heads, FFN units: :mod:`istfx.passes.heads`)
and which residual blocks the depth pass deals out (``blocks="*"``).

torchvision's PyPI wheel links CUDA libraries and does not import next to the
project's CPU torch, so the benchmark runs in a venv of its own (the default
wheels run on CPU)::

    python3.11 -m venv /work/zoo-venv
    /work/zoo-venv/bin/pip install torch torchvision transformers safetensors tqdm numpy sympy hypothesis pytest
    /work/zoo-venv/bin/pip install -e . --no-deps
    nice -n 10 /work/zoo-venv/bin/python benchmarks/zoo.py

(In December 2026 that brings torch 2.14.1+cu130, torchvision 0.29.1+cu130 and transformers 5.25.0; the
project's own venv has torch 2.13.0+cpu. The Hugging Face rows also run there: ``--zoo hf``.)

``tests/test_zoo.py`` checks the IST invariants (tests/conftest.py) on the ``ZOO``
entries (``build``, :func:`inputs`); it needs no torchvision.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97
SUBNETS = 4
TIMEOUT = 600
# Above this many parameters a torchvision model is checked in float32 (float64 copies would not fit in memory).
FLOAT64_MAX_PARAMS = 150_000_000
_T0 = time.perf_counter()


@dataclass(frozen=True)
class Entry:
    title: str
    cls: str  # transformers class
    config: Callable[[Any], Any]  # transformers module -> config
    kind: str = "decoder"  # "decoder"/"encoder" (input_ids), "seq2seq" (+ decoder_input_ids), "vision", "audio"
    key: str = "logits"  # the output field a loss is taken on
    image: int = 16  # vision: image side
    dtype: str = "float64"  # the dtype of the benchmark's checks
    note: str = ""

    def model_class(self):
        import transformers

        return getattr(transformers, self.cls)


_LM = dict(vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0)
# Grouped-query attention: 8 query heads in 4 KV groups (head_dim 4), so S = 4 deals out one KV group each.
_GQA = dict(_LM, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0)
_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
                 use_cache=False)
_BARTLIKE = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                 eos_token_id=2, decoder_start_token_id=2, use_cache=False)
_MOE = dict(num_experts_per_tok=2)
_MOE_NOTE = ("float32: transformers' default experts implementation (grouped_mm) has no float64 kernel on CPU, "
             "and the per-expert loop does not capture")

# The models tests/test_zoo.py checks (every invariant, float64, heads and FFN split).
ZOO: dict[str, Entry] = {
    "bert": Entry("BERT", "BertModel", lambda tf: tf.BertConfig(**_BERTLIKE), "encoder", "last_hidden_state"),
    "roberta": Entry("RoBERTa", "RobertaModel", lambda tf: tf.RobertaConfig(**_BERTLIKE, pad_token_id=1),
                     "encoder", "last_hidden_state"),
    "distilbert": Entry("DistilBERT", "DistilBertModel", lambda tf: tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0,
        max_position_embeddings=64), "encoder", "last_hidden_state"),
    "gpt2": Entry("GPT-2", "GPT2LMHeadModel", lambda tf: tf.GPT2Config(
        **_LM, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt_neo": Entry("GPT-Neo", "GPTNeoForCausalLM", lambda tf: tf.GPTNeoConfig(
        **_LM, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, intermediate_size=64, max_position_embeddings=64, resid_dropout=0.0, embed_dropout=0.0,
        attention_dropout=0.0), note="its attention casts query and key to float32 (`query.to(torch.float32)`), "
        "so a float64 model's outputs carry float32 rounding (errors ~1e-9)"),
    "opt": Entry("OPT", "OPTForCausalLM", lambda tf: tf.OPTConfig(
        **_LM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=1)),
    "llama": Entry("LLaMA", "LlamaForCausalLM", lambda tf: tf.LlamaConfig(**_GQA)),
    "mistral": Entry("Mistral", "MistralForCausalLM", lambda tf: tf.MistralConfig(**_GQA, sliding_window=None)),
    "qwen2": Entry("Qwen2", "Qwen2ForCausalLM", lambda tf: tf.Qwen2Config(**_GQA)),
    "phi3": Entry("Phi-3", "Phi3ForCausalLM", lambda tf: tf.Phi3Config(
        **_GQA, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "gemma": Entry("Gemma", "GemmaForCausalLM", lambda tf: tf.GemmaConfig(**_GQA, head_dim=4)),
    "t5": Entry("T5", "T5Model", lambda tf: tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, use_cache=False), "seq2seq",
        "last_hidden_state"),
    "bart": Entry("BART", "BartModel", lambda tf: tf.BartConfig(**_BARTLIKE), "seq2seq", "last_hidden_state"),
    "vit": Entry("ViT", "ViTModel", lambda tf: tf.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "vision",
        "last_hidden_state"),
    # Beyond the list: a fused QKV laid out per head (q|k|v inside each head) and partial rotary embeddings.
    "gpt_neox": Entry("GPT-NeoX", "GPTNeoXForCausalLM", lambda tf: tf.GPTNeoXConfig(
        **_LM, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)),
    # A fused QKV laid out per KV group, whose k and v slots are picked out with list indices.
    "falcon": Entry("Falcon", "FalconForCausalLM", lambda tf: tf.FalconConfig(
        **_LM, hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=4,
        new_decoder_architecture=True, hidden_dropout=0.0, attention_dropout=0.0)),
}

# The rest of the benchmark's Hugging Face zoo (same sizes; not part of the test suite).
MORE: dict[str, Entry] = {
    # Decoders with grouped-query attention (8 query heads in 4 KV groups).
    "qwen3": Entry("Qwen3", "Qwen3ForCausalLM", lambda tf: tf.Qwen3Config(**_GQA, head_dim=4)),
    "gemma2": Entry("Gemma 2", "Gemma2ForCausalLM", lambda tf: tf.Gemma2Config(**_GQA, head_dim=4, sliding_window=4)),
    "gemma3": Entry("Gemma 3", "Gemma3ForCausalLM", lambda tf: tf.Gemma3TextConfig(
        **_GQA, head_dim=4, sliding_window=4)),
    "olmo": Entry("OLMo", "OlmoForCausalLM", lambda tf: tf.OlmoConfig(**_GQA)),
    "olmo2": Entry("OLMo 2", "Olmo2ForCausalLM", lambda tf: tf.Olmo2Config(**_GQA)),
    "granite": Entry("Granite", "GraniteForCausalLM", lambda tf: tf.GraniteConfig(**_GQA)),
    "smollm3": Entry("SmolLM3", "SmolLM3ForCausalLM", lambda tf: tf.SmolLM3Config(**_GQA)),
    "cohere": Entry("Cohere", "CohereForCausalLM", lambda tf: tf.CohereConfig(**_GQA)),
    "stablelm": Entry("StableLM", "StableLmForCausalLM", lambda tf: tf.StableLmConfig(
        **_GQA, hidden_dropout=0.0, attention_dropout=0.0)),
    "phi": Entry("Phi", "PhiForCausalLM", lambda tf: tf.PhiConfig(
        **_GQA, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "starcoder2": Entry("StarCoder2", "Starcoder2ForCausalLM", lambda tf: tf.Starcoder2Config(
        **_GQA, residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)),
    # Mixture of experts (4 experts, top 2).
    "mixtral": Entry("Mixtral", "MixtralForCausalLM", lambda tf: tf.MixtralConfig(
        **_GQA, **_MOE, num_local_experts=4), dtype="float32", note=_MOE_NOTE),
    "qwen2_moe": Entry("Qwen2-MoE", "Qwen2MoeForCausalLM", lambda tf: tf.Qwen2MoeConfig(
        **_GQA, **_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64),
        dtype="float32", note=_MOE_NOTE),
    "qwen3_moe": Entry("Qwen3-MoE", "Qwen3MoeForCausalLM", lambda tf: tf.Qwen3MoeConfig(
        **_GQA, **_MOE, num_experts=4, moe_intermediate_size=32, head_dim=4), dtype="float32", note=_MOE_NOTE),
    "olmoe": Entry("OLMoE", "OlmoeForCausalLM", lambda tf: tf.OlmoeConfig(**_GQA, **_MOE, num_experts=4),
                   dtype="float32", note=_MOE_NOTE),
    # Other attention layouts: ALiBi, interleaved rotary, multi-query, a state-space model.
    "bloom": Entry("BLOOM", "BloomForCausalLM", lambda tf: tf.BloomConfig(
        **_LM, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)),
    "mpt": Entry("MPT", "MptForCausalLM", lambda tf: tf.MptConfig(
        **_LM, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64)),
    "gptj": Entry("GPT-J", "GPTJForCausalLM", lambda tf: tf.GPTJConfig(
        **_LM, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)),
    "codegen": Entry("CodeGen", "CodeGenForCausalLM", lambda tf: tf.CodeGenConfig(
        **_LM, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64, n_positions=64, n_ctx=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt_bigcode": Entry("GPTBigCode (multi-query)", "GPTBigCodeForCausalLM", lambda tf: tf.GPTBigCodeConfig(
        **_LM, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, multi_query=True)),
    "mamba": Entry("Mamba", "MambaForCausalLM", lambda tf: tf.MambaConfig(
        **_LM, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)),
    # Encoders.
    "electra": Entry("ELECTRA", "ElectraModel", lambda tf: tf.ElectraConfig(**_BERTLIKE, embedding_size=16),
                     "encoder", "last_hidden_state"),
    "albert": Entry("ALBERT", "AlbertModel", lambda tf: tf.AlbertConfig(**_BERTLIKE, embedding_size=16),
                    "encoder", "last_hidden_state"),
    "deberta_v2": Entry("DeBERTa-v2", "DebertaV2Model", lambda tf: tf.DebertaV2Config(
        **_BERTLIKE, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16),
        "encoder", "last_hidden_state"),
    "xlm_roberta": Entry("XLM-RoBERTa", "XLMRobertaModel", lambda tf: tf.XLMRobertaConfig(
        **_BERTLIKE, pad_token_id=1), "encoder", "last_hidden_state"),
    # Encoder-decoders.
    "mbart": Entry("mBART", "MBartModel", lambda tf: tf.MBartConfig(**_BARTLIKE), "seq2seq", "last_hidden_state"),
    "pegasus": Entry("Pegasus", "PegasusModel", lambda tf: tf.PegasusConfig(**_BARTLIKE), "seq2seq",
                     "last_hidden_state"),
    "marian": Entry("Marian", "MarianModel", lambda tf: tf.MarianConfig(**_BARTLIKE), "seq2seq",
                    "last_hidden_state"),
    "led": Entry("LED", "LEDModel", lambda tf: tf.LEDConfig(
        **{k: v for k, v in _BARTLIKE.items() if k != "max_position_embeddings"}, attention_window=4,
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64), "seq2seq", "last_hidden_state"),
    "whisper": Entry("Whisper", "WhisperModel", lambda tf: tf.WhisperConfig(
        **{k: v for k, v in _BARTLIKE.items() if k != "max_position_embeddings"}, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16), "audio", "last_hidden_state"),
    # Vision.
    "vit_cls": Entry("ViT (classifier)", "ViTForImageClassification", lambda tf: tf.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10), "vision"),
    "deit": Entry("DeiT", "DeiTModel", lambda tf: tf.DeiTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "vision",
        "last_hidden_state"),
    "swin_hf": Entry("Swin (HF)", "SwinModel", lambda tf: tf.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[4, 4], window_size=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0), "vision",
        "last_hidden_state", image=32),
    "convnext_hf": Entry("ConvNeXt (HF)", "ConvNextModel", lambda tf: tf.ConvNextConfig(
        image_size=32, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], drop_path_rate=0.0), "vision",
        "last_hidden_state", image=32),
}

HF: dict[str, Entry] = {**ZOO, **MORE}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The Hugging Face zoo model `name`, tiny, random weights (seeded), in training mode."""
    import transformers

    entry = HF[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = entry.model_class()(entry.config(transformers))
    return model.to(dtype).train()


def inputs(name: str, batch: int = 2, length: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword inputs for the Hugging Face zoo model `name`: token ids (and decoder ids), images or audio."""
    gen = torch.Generator().manual_seed(seed)
    entry = HF[name]
    if entry.kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, entry.image, entry.image, generator=gen, dtype=dtype)}
    if entry.kind == "audio":  # Whisper: mel features of exactly 2 x max_source_positions frames
        return {"input_features": torch.randn(batch, 8, 16, generator=gen, dtype=dtype),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, max(1, length - 2)), generator=gen)}
    out = {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=gen)}
    if entry.kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(1, length - 2)), generator=gen)
    return out


def compile_entry(name: str, subnets: int, dtype: torch.dtype = torch.float32, **options):
    import istfx

    return istfx.compile(build(name, dtype), subnets=subnets, example_inputs=inputs(name, dtype=dtype), **options)


# -- torchvision -----------------------------------------------------------------------


def torchvision_models() -> list[str]:
    """Every torchvision classification model (``list_models(module=torchvision.models)``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_image(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def build_torchvision(name: str, seed: int = 0) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None).train()


# -- one model, in its own process ----------------------------------------------------------


def _conftest():
    """The invariant checks of tests/conftest.py."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest

    return conftest


def no_dropout(model: torch.nn.Module) -> int:
    """Set every dropout / stochastic-depth probability to 0 (deterministic training-mode outputs)."""
    n = 0
    for module in model.modules():
        kind = type(module).__name__
        if ("Dropout" in kind or "StochasticDepth" in kind or "DropPath" in kind) and isinstance(
                getattr(module, "p", None), float):
            module.p = 0.0
            n += 1
        elif "DropPath" in kind and isinstance(getattr(module, "drop_prob", None), float):
            module.drop_prob = 0.0
            n += 1
    return n


def _error(exc: BaseException, ist: Any = None) -> dict:
    """The first line of an error and where it was raised: the innermost istfx frame, the innermost frame, and
    for an error inside a subnet's graph, the graph op and the model's source line behind it."""
    text = str(exc).strip().splitlines()
    out = {"error": f"{type(exc).__name__}: {text[0][:400] if text else ''}"}
    frames = traceback.extract_tb(exc.__traceback__)
    graph = [f for f in frames if f.filename.startswith("<eval_with_key")]
    if graph:
        out.update(_graph_op(graph[-1], ist))
    ours = [f for f in frames if "/istfx/" in f.filename or "/passes/" in f.filename]
    if ours:
        f = ours[-1]
        out["istfx_frame"] = f"{_short(f.filename)}:{f.lineno} in {f.name}"
    if frames:
        f = frames[-1]
        out["frame"] = f"{_short(f.filename)}:{f.lineno} in {f.name}"
    return out


def _graph_op(frame, ist) -> dict:
    """The aten op on a generated graph line, and the source line of the captured node of that name."""
    import linecache

    line = frame.line or linecache.getline(frame.filename, frame.lineno)
    m = re.match(r"\s*(\w+) = torch\.ops\.([\w.]+)", line or "")
    if not m:
        return {}
    out = {"op": m.group(2)}
    module = getattr(getattr(ist, "captured", None), "module", None)
    node = next((n for n in module.graph.nodes if n.name == m.group(1)), None) if module is not None else None
    if node is not None:
        stack = node.meta.get("stack_trace") or ""
        files = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', stack)
        outside = [f for f in files if "/torch/" not in f[0]]  # the model's line, not torch.nn's
        if files:
            path, lineno, fn, code = (outside or files)[-1]
            out["source"] = f"{_short(path)}:{lineno} in {fn}: {code.strip()[:120]}"
        scopes = list(node.meta.get("nn_module_stack", {}).values())
        if scopes:
            out["module"] = scopes[-1][0]
    return out


def _short(path: str) -> str:
    for marker in ("/site-packages/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


class Recorder:
    """A row written to disk after every stage, so that a timeout or a crash keeps what was measured."""

    def __init__(self, path: Path | None, row: dict) -> None:
        self.path, self.row = path, row

    def stage(self, name: str, **values) -> None:
        self.row.update(values)
        self.row["stage"] = name
        self.save()
        print(f"[{time.strftime('%H:%M:%S')}] {self.row['name']}: {name}", file=sys.stderr, flush=True)

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.row, default=str))


def _group_summary(plan) -> dict:
    data = plan.to_dict()
    split, shared, frozen = Counter(), Counter(), Counter()
    counts = {"split": 0, "shared": 0, "frozen": 0}
    for g in data["groups"]:
        if g["split"]:
            counts["split"] += 1
        elif g["status"] == "frozen":
            counts["frozen"] += 1
            frozen[_reason(g["reasons"][0] if g["reasons"] else "frozen")] += 1
        else:
            counts["shared"] += 1
            shared[_reason(g["kept_whole"] or (g["reasons"][0] if g["reasons"] else g["status"]))] += 1
    diagnostics = Counter(f"{d['op']} at {d['source']}" if d["source"] else d["op"] for d in data["diagnostics"])
    return {"groups": counts, "shared_why": dict(shared.most_common(4)), "frozen_why": dict(frozen.most_common(4)),
            "no_rule": dict(diagnostics.most_common(8)),
            "no_rule_ops": sorted({d["op"] for d in data["diagnostics"]})}


def _reason(text: str) -> str:
    return re.sub(r" \(kept whole:.*\)$", "", str(text))[:160]


def _compare(actual, expected, tolerance) -> tuple[float, float, bool, str]:
    """(max abs error, max |expected|, within tolerance, structure problem) over the floating leaves."""
    import torch.utils._pytree as pytree

    act, act_spec = pytree.tree_flatten(actual)
    exp, exp_spec = pytree.tree_flatten(expected)
    if act_spec != exp_spec:
        return float("nan"), 0.0, False, f"output structure {_spec(act_spec)} != the model's {_spec(exp_spec)}"
    worst, scale, ok = 0.0, 0.0, True
    for a, e in zip(act, exp):
        if not isinstance(e, torch.Tensor):
            ok = ok and a == e
            continue
        if a.shape != e.shape:
            return float("nan"), 0.0, False, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not e.is_floating_point():
            ok = ok and torch.equal(a, e)
            continue
        if e.numel():
            worst = max(worst, (a - e).abs().max().item())
            scale = max(scale, e.abs().max().item())
            ok = ok and torch.allclose(a, e, **tolerance)
    return worst, scale, ok, ""


def _spec(spec) -> str:
    kind = getattr(spec, "type", None)
    return f"{getattr(kind, '__name__', 'leaf')} of {spec.num_leaves}" if kind is not None else "a tensor"


def measure(zoo: str, name: str, subnets: int = SUBNETS, result: Path | None = None) -> dict:
    """One row of the table (see the module docstring); runs in the model's own process."""
    import istfx

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    c = _conftest()
    row: dict[str, Any] = {"zoo": zoo, "name": name, "subnets": subnets,
                           "run_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rec = Recorder(result, row)
    rec.stage("build")
    if zoo == "hf":
        entry = HF[name]
        dtype = getattr(torch, entry.dtype)
        model = build(name, dtype)
        args, kwargs = (), inputs(name, dtype=dtype)
        other = ((), inputs(name, batch=3, length=6, seed=1, dtype=dtype))
        key = entry.key
        row.update(model=entry.title, cls=entry.cls, **({"note": entry.note} if entry.note else {}))
    else:
        model = build_torchvision(name)
        size = sum(p.numel() for p in model.parameters())
        dtype = torch.float64 if size <= FLOAT64_MAX_PARAMS else torch.float32
        model = model.to(dtype)
        side = torchvision_image(name)
        gen = torch.Generator().manual_seed(0)
        args, kwargs = (torch.randn(2, 3, side, side, generator=gen, dtype=dtype),), {}
        other = ((torch.randn(3, 3, side, side, generator=gen, dtype=dtype),), {})
        key = None
        row.update(model=name, cls=type(model).__name__, image=side)
    row["dropouts_zeroed"] = no_dropout(model)
    row["dtype"] = str(dtype).replace("torch.", "")
    tolerance = dict(atol=c.ATOL, rtol=c.RTOL) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    row["tolerance"] = tolerance
    row["parameters"] = sum(p.numel() for p in model.parameters())

    # Warm-up: torch.export's first call pays for imports and caches that neither timing should carry.
    torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),),
                        strict=False)
    rec.stage("export")
    start = time.perf_counter()
    try:
        torch.export.export(model, args, kwargs, strict=False)
        row["export_s"] = round(time.perf_counter() - start, 2)
        row["exported"] = True
    except Exception as exc:
        row["exported"] = False
        row["export_error"] = _error(exc)["error"]

    rec.stage("compile")
    start = time.perf_counter()
    try:
        ist = istfx.compile(model, subnets=subnets, example_inputs=(args, kwargs))
    except Exception as exc:
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row.update(captured=False, compile_error=_error(exc))
        rec.stage("done")
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["captured"] = True
    if row.get("export_s"):
        row["compile_over_export"] = round(row["compile_s"] / row["export_s"], 2)
    plan = ist.plan
    row.update(_group_summary(plan))
    row["parameters_full"] = plan.parameters_full
    row["parameters_per_subnet"] = list(plan.parameters_per_subnet)
    row["largest_subnet"] = round(max(plan.parameters_per_subnet) / max(1, plan.parameters_full), 4)
    if zoo == "hf":
        try:
            row.update(hf_roles(ist))
        except Exception as exc:
            row["roles_error"] = _error(exc)["error"]

    rec.stage("round trip")
    try:
        c.check_round_trip(ist, 0)
        row["round_trip"] = True
    except Exception as exc:
        row.update(round_trip=False, round_trip_error=_error(exc, ist))

    rec.stage("mask equivalence")
    row["mask"] = _mask_equivalence(c, ist, (args, kwargs), key, tolerance)

    rec.stage("train")
    try:
        c.check_interface(ist, [other], round=2)
        row["train_run"] = True
    except Exception as exc:
        row.update(train_run=False, train_error=_error(exc, ist))

    rec.stage("eval")
    row.update(_eval_runs(c, ist, (args, kwargs), other, key, tolerance))

    if zoo == "hf":
        rec.stage("depth")
        row.update(hf_depth(name, subnets))
    row["total_s"] = round(time.perf_counter() - _T0, 1)
    rec.stage("done")
    return row


def _mask_equivalence(c, ist, inputs, key, tolerance) -> dict:
    """Subnets of round 1 against the masked full model, training mode (conftest.check_forward_equivalence)."""
    out: dict[str, Any] = {"checked": bool(ist.plan.split)}
    if not ist.plan.split:
        out["note"] = "nothing split"
        return out
    try:
        subnets = ist.decompose(1)
        slices = ist.slices(1)
        worst, scale, ok = 0.0, 0.0, True
        for s, subnet in enumerate(subnets):
            expected = c.pick(c.call(c.masked_model(ist, slices, s), inputs), key)
            actual = c.pick(c.call(subnet, inputs), key)
            err, mag, good, problem = _compare(actual, expected, tolerance)
            if problem:
                out.update(ok=False, error=f"subnet {s}: {problem}")
                return out
            worst, scale, ok = max(worst, err), max(scale, mag), ok and good
        out.update(ok=ok, max_error=worst, max_output=scale)
    except Exception as exc:
        out.update(ok=False, **_error(exc, ist))
    return out


def _eval_runs(c, ist, inputs, other, key, tolerance) -> dict:
    """Every subnet in evaluation mode on another batch size; subnet 0 against the masked model in eval mode."""
    out: dict[str, Any] = {}
    try:
        subnets = ist.decompose(2)
        import copy

        reference = copy.deepcopy(ist.model).eval()
        with torch.no_grad():
            expected = c.call(reference, other)
            for s, subnet in enumerate(subnets):
                subnet.eval()
                got = c.call(subnet, other)
                _, _, _, problem = _compare(got, expected, dict(atol=float("inf"), rtol=0.0))
                if problem:
                    raise AssertionError(f"subnet {s}: {problem}")
                if not all(torch.isfinite(t).all() for t in c.tensor_leaves(got) if t.is_floating_point()):
                    raise AssertionError(f"subnet {s}: non-finite output in eval mode")
        out["eval_run"] = True
    except Exception as exc:
        out.update(eval_run=False, eval_error=_error(exc, ist))
        return out
    if not ist.plan.split:
        return out
    try:
        # Fresh subnets: the training-mode calls above moved their BatchNorm running statistics.
        subnets, slices = ist.decompose(1), ist.slices(1)
        with torch.no_grad():
            expected = c.pick(c.call(c.masked_model(ist, slices, 0).eval(), inputs), key)
            actual = c.pick(c.call(subnets[0].eval(), inputs), key)
        err, _, ok, problem = _compare(actual, expected, tolerance)
        out["eval_mask"] = {"ok": ok and not problem, "max_error": err, **({"error": problem} if problem else {})}
    except Exception as exc:
        out["eval_mask"] = {"ok": False, **_error(exc, ist)}
    return out


# -- Hugging Face: roles and depth ------------------------------------------------------------


def _pattern(modules: list[str]) -> str:
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", m) or "<root>" for m in modules))


def _why(summary: dict, role: str) -> str:
    why = summary.get(role, {}).get("why", {})
    return "; ".join(re.sub(r" \(kept whole:.*\)$", "", text) for text, _ in why.most_common(2)) if why else ""


def _split_text(summary: dict, role: str) -> tuple[bool | None, str]:
    entry = summary.get(role)
    if not entry:
        return None, "none found"
    n, split = entry["groups"], entry["split"]
    if split:
        per = entry["per_subnet"][0]
        units = entry["units"][0]
        text = f"{split}/{n} groups, {units} units -> {'/'.join(map(str, per))}"
        return split == n, text
    return False, f"shared ({_why(summary, role)})"


def hf_roles(ist) -> dict:
    """Attention heads and FFN units (from the axis algebra), split or why not."""
    from istfx.passes import describe, role_summary

    summary = role_summary(ist)
    out: dict[str, Any] = {}
    out["heads_split"], out["heads"] = _split_text(summary, "heads")
    out["heads_detail"] = next((r.detail for r in describe(ist).values() if r.name == "heads"), "")
    out["ffn_split"], out["ffn"] = _split_text(summary, "ffn")
    out["d_model"] = "split" if summary.get("d_model", {}).get("split") else "shared"
    return out


def hf_depth(name: str, subnets: int) -> dict:
    """The residual blocks the depth pass deals out with ``blocks="*"`` (heads + FFN split too)."""
    out: dict[str, Any] = {}
    scaling = "eval"
    try:
        try:
            deep = compile_entry(name, subnets, blocks="*")
        except Exception as exc:
            if "depth_scaling='train'" not in str(exc):
                raise
            scaling = "train"
            deep = compile_entry(name, subnets, blocks="*", depth_scaling="train")
        blocks = [b.module for b in deep.plan.blocks]
        out["blocks"] = blocks
        out["block_pattern"] = _pattern(blocks)
        out["depth_scaling"] = scaling
        out["parameters_per_subnet_depth"] = max(deep.subnet_parameter_counts(0))
    except Exception as exc:
        out["blocks"] = []
        out["depth_error"] = _error(exc)["error"]
    return out


# -- the driver: one process per model -----------------------------------------------------


def run_one(zoo: str, name: str, subnets: int, timeout: float, logs: Path, commit: str = "") -> dict:
    """`measure` in a subprocess with a timeout; a timeout or a crash keeps the stages done so far."""
    logs.mkdir(parents=True, exist_ok=True)
    result = logs / f"{zoo}-{name}.json"
    log = logs / f"{zoo}-{name}.log"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ISTFX_TEST_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", zoo, name, "--subnets", str(subnets),
           "--result", str(result)]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
    wall = round(time.perf_counter() - start, 1)
    try:
        row = json.loads(result.read_text())
    except (OSError, ValueError):
        row = {"zoo": zoo, "name": name, "subnets": subnets, "stage": "start"}
    row["wall_s"] = wall
    row["istfx_commit"] = commit
    if timed_out:
        row["timeout"] = f"timeout after {timeout:.0f} s in stage '{row.get('stage')}'"
    elif rc != 0 or row.get("stage") != "done":
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
        row["crash"] = f"worker exited with code {rc} in stage '{row.get('stage')}': {' / '.join(tail)[:400]}"
    return row


def model_names(zoo: str) -> list[str]:
    if zoo == "hf":
        return list(HF)
    return torchvision_models()


# Captures known to take many minutes (Swin: symbolic shapes of dynamic H and W); run last.
SLOW = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")
# One small model of every family (and the architectures issue 11 is about) first, so that a run cut short
# still covers every pattern; then the rest.
FIRST = [("torchvision", n) for n in (
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121", "googlenet", "mnasnet0_5", "vgg11",
    "vit_b_32", "alexnet", "inception_v3", "efficientnet_v2_s", "convnext_tiny", "maxvit_t", "wide_resnet50_2",
    "vgg11_bn")] + [("hf", n) for n in (
        "llama", "bert", "t5", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "bloom", "mpt", "gptj", "codegen",
        "mamba", "vit_cls", "swin_hf", "convnext_hf", "whisper")] + [("torchvision", "swin_t")]


QUICK = {"torchvision": ["resnet18", "mobilenet_v2", "vit_b_32", "regnet_x_400mf", "squeezenet1_1"],
         "hf": ["llama", "bert", "mixtral", "bloom", "vit_cls"]}


def versions() -> dict:
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "transformers"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[pkg] = None
    try:
        out["istfx_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return out


def _zoos() -> dict[str, list[str]]:
    """The whole zoos, so that the page can list the models not measured yet."""
    try:
        return {"torchvision": torchvision_models(), "hf": list(HF)}
    except ImportError:
        return {"hf": list(HF)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=["torchvision", "hf"], action="append",
                        help="one zoo (repeatable; default both)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="just these models (torchvision or HF names)")
    parser.add_argument("--quick", action="store_true", help="a handful of models per zoo; print, write nothing")
    parser.add_argument("--subnets", type=int, default=SUBNETS)
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per model (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/istfx-zoo-logs"))
    parser.add_argument("--print", dest="print_only", action="store_true", help="write nothing")
    parser.add_argument("--merge", action="store_true", help="keep the rows of docs/zoo.json this run does not redo")
    parser.add_argument("--families-first", action="store_true",
                        help="one model of every family first (a run cut short still covers every pattern)")
    parser.add_argument("--render", action="store_true", help="rewrite zoo.md from zoo.json, run nothing")
    parser.add_argument("--worker", nargs=2, metavar=("ZOO", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        row = measure(args.worker[0], args.worker[1], args.subnets, args.result)
        print(json.dumps(row, default=str)[:2000], flush=True)
        return [row]

    json_path, md_path = args.out / "zoo.json", args.out / "zoo.md"
    if args.render:
        data = json.loads(json_path.read_text())
        data["zoos"] = {**data.get("zoos", {}), **_zoos()}
        json_path.write_text(json.dumps(data, indent=1, default=str))
        md_path.write_text(markdown(data))
        return data["rows"]

    zoos = args.zoo or ["hf", "torchvision"]  # the quick zoo first
    if args.only:
        try:
            tv = set(torchvision_models()) if "torchvision" in zoos else set()
        except ImportError:  # the project's own venv: Hugging Face rows only
            tv = set()
        unknown = [n for n in args.only if n not in tv and n not in HF]
        if unknown:
            parser.error(f"unknown models {unknown}")
        todo = [("torchvision", n) for n in args.only if n in tv] + \
               [("hf", n) for n in args.only if n in HF and "hf" in zoos]
    elif args.quick:
        todo = [(z, n) for z in zoos for n in QUICK[z]]
    else:
        todo = [(z, n) for z in zoos for n in model_names(z)]
        todo = [t for t in todo if t[1] not in SLOW] + [t for t in todo if t[1] in SLOW]  # a partial run has the rest
        if args.families_first:
            todo = [t for t in FIRST if t in todo] + [t for t in todo if t not in FIRST]
    write = not (args.print_only or args.quick)
    partial = bool(args.only or args.zoo or args.merge) and json_path.exists()
    data = json.loads(json_path.read_text()) if partial else {"rows": []}
    if not isinstance(data, dict) or "rows" not in data:
        data = {"rows": []}
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--out" in shown and args.out.name == "docs":  # the checkout's docs/, wherever it is
        i = shown.index("--out")
        del shown[i:i + 2]
    command = " ".join(["python benchmarks/zoo.py", *shown])
    data.setdefault("runs", []).append({
        "command": command, "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "timeout_s": args.timeout, "subnets": args.subnets, "models": len(todo), **versions()})
    if not partial:
        data["runs"] = data["runs"][-1:]
    data["zoos"] = {**data.get("zoos", {}), **_zoos()}
    rows = {(r["zoo"], r["name"]): r for r in data["rows"]}
    done = []
    for i, (zoo, name) in enumerate(todo, 1):
        row = run_one(zoo, name, args.subnets, args.timeout, args.logs, data["runs"][-1].get("istfx_commit", ""))
        rows[(zoo, name)] = row
        done.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {i}/{len(todo)} {zoo}/{name}: {short_status(row)}", file=sys.stderr,
              flush=True)
        if write:
            data["rows"] = [rows[k] for k in sorted(rows, key=lambda k: (k[0] != "torchvision", _order(k)))]
            data["runs"][-1]["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            data["runs"][-1]["done"] = i
            args.out.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(data, indent=1, default=str))
            md_path.write_text(markdown(data))
    if not write:
        print(markdown({"rows": done, "runs": data["runs"][-1:]}))
    return done


def _order(key: tuple[str, str]) -> Any:
    zoo, name = key
    if zoo == "hf":
        return list(HF).index(name) if name in HF else len(HF)
    return name


def short_status(row: dict) -> str:
    if row.get("timeout") or row.get("crash"):
        return row.get("timeout") or row.get("crash")
    if not row.get("captured"):
        return "not captured: " + row.get("compile_error", {}).get("error", "?")[:120]
    g = row["groups"]
    mask = row.get("mask", {})
    return (f"split {g['split']} shared {g['shared']} frozen {g['frozen']}, round trip {row.get('round_trip')}, "
            f"mask {mask.get('ok')} ({mask.get('max_error', mask.get('error', ''))}), train {row.get('train_run')}, "
            f"eval {row.get('eval_run')}, largest {row.get('largest_subnet')}, "
            f"compile {row.get('compile_s')} s / export {row.get('export_s')} s")


def markdown(data: dict) -> str:
    """docs/zoo.md from the rows (benchmarks/zoo_report.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo_report

    return zoo_report.markdown(data)


if __name__ == "__main__":
    main()
