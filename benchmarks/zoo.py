"""The Hugging Face model zoo under istfx: what each model's plan splits, as a table.

    python benchmarks/zoo.py                 # writes docs/zoo.md and docs/zoo.json (~2 minutes)
    python benchmarks/zoo.py --only llama t5 # a few rows, printed

Every model is built from a tiny config with random weights (no download):
hidden 32, 2 layers, 4 attention heads (8 query heads in 4 KV groups for
grouped-query attention), vocabulary 97, dropout 0. For each,
``istfx.compile`` runs at S = 4 (and S = 2 where S = 4 leaves heads whole);
the row says whether it was captured, whether attention heads and FFN units
are split, which residual blocks the depth pass can deal out, the parameters
each subnet holds, and, where a model falls short, the reason from the plan.
Roles (heads, FFN, d_model) come from :mod:`istfx.passes.heads`, which reads
them off the axis algebra, not off the config.

``tests/test_zoo.py`` checks the IST invariants (tests/conftest.py) on the same
definitions (``ZOO``, :func:`build`, :func:`inputs`).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97


@dataclass(frozen=True)
class Entry:
    title: str
    cls: str  # transformers class
    config: Callable[[Any], Any]  # transformers module -> config
    kind: str = "decoder"  # "decoder" / "encoder" (input_ids), "seq2seq" (+ decoder_input_ids), "vision"
    key: str = "logits"  # the output field a loss is taken on

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
        attention_dropout=0.0)),
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
    "bart": Entry("BART", "BartModel", lambda tf: tf.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, use_cache=False), "seq2seq", "last_hidden_state"),
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


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The zoo model `name`, tiny, random weights (seeded), in training mode."""
    import transformers

    entry = ZOO[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = entry.model_class()(entry.config(transformers))
    return model.to(dtype).train()


def inputs(name: str, batch: int = 2, length: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword inputs for the zoo model `name`: token ids (and decoder ids), or images."""
    gen = torch.Generator().manual_seed(seed)
    kind = ZOO[name].kind
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen, dtype=dtype)}
    out = {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=gen)}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(1, length - 2)), generator=gen)
    return out


def compile_entry(name: str, subnets: int, dtype: torch.dtype = torch.float32, **options):
    import istfx

    return istfx.compile(build(name, dtype), subnets=subnets, example_inputs=inputs(name, dtype=dtype), **options)


# -- the table -----------------------------------------------------------------------


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


def row(name: str, subnets: int = 4) -> dict:
    """One zoo row: capture, heads/FFN/d_model roles, depth, parameters per subnet."""
    from istfx.passes import describe, role_summary

    entry = ZOO[name]
    out: dict[str, Any] = {"name": name, "model": entry.title, "class": entry.cls, "subnets": subnets}
    start = time.perf_counter()
    try:
        ist = compile_entry(name, subnets)
    except Exception as exc:  # the row records why a model cannot be compiled
        out.update(captured=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return out
    out["compile_seconds"] = round(time.perf_counter() - start, 2)
    summary = role_summary(ist)
    details = describe(ist)
    out["captured"] = True
    out["roles"] = {role: {k: (dict(v) if k == "why" else v) for k, v in info.items()}
                    for role, info in summary.items()}
    out["heads_split"], out["heads"] = _split_text(summary, "heads")
    heads_detail = next((r.detail for r in details.values() if r.name == "heads"), "")
    out["heads_detail"] = heads_detail
    out["ffn_split"], out["ffn"] = _split_text(summary, "ffn")
    out["d_model"] = "shared" if not summary.get("d_model", {}).get("split") else "split"
    out["parameters_full"] = ist.plan.parameters_full
    out["parameters_per_subnet"] = max(ist.plan.parameters_per_subnet)
    out["diagnostics"] = [str(d) for d in ist.plan.diagnostics]
    if out["heads_split"] is False and subnets > 2:
        small = compile_entry(name, 2)
        out["heads_at_2"] = _split_text(role_summary(small), "heads")[1]
    # Depth: every droppable residual block, dealt out among the subnets (heads + FFN split too).
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
        out["depth_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return out


NOTES = {
    "bert": "post-LN: a layer's attention and FFN branches are separate blocks (each keeps its LayerNorm)",
    "roberta": "post-LN: attention and FFN branches are separate blocks",
    "distilbert": "post-LN: attention and FFN branches are separate blocks",
    "t5": "one position bias is added in every layer, so the heads of all encoder self-attention layers "
          "are one coupled group (likewise decoder self- and cross-attention): 3 head groups",
    "gpt_neox": "parallel attention + MLP: the branch ends in an add, so depth uses depth_scaling='train'",
    "falcon": "parallel attention + MLP (depth_scaling='train'); its Linear reads `weight.T`, a node outside "
              "the branch, so a dropped layer's weights stay in the subnet (only its LayerNorms go)",
    "gemma": "GeGLU FFN (gate and up coupled)",
    "phi3": "fused gate_up_proj: gate and up halves are one coupled FFN group; fused qkv_proj",
}


def markdown(rows: list[dict], subnets: int) -> str:
    lines = [
        "# Hugging Face model zoo",
        "",
        "Generated by `python benchmarks/zoo.py` (do not edit by hand). Every model is built from a tiny "
        "config with random weights, no download: hidden 32, 2 layers, 4 attention heads (8 query heads in 4 "
        "KV groups where the model has grouped-query attention), FFN 64, vocabulary 97. `tests/test_zoo.py` checks the "
        "IST invariants (tests/conftest.py) on each (round trip, coverage, mask equivalence in float64, another batch "
        "size).",
        "",
        f"Columns at S = {subnets}: **heads** = groups of attention heads (or KV groups) split / found, "
        "units per group and per subnet; **FFN** = the same for FFN hidden units; **layers** = residual "
        "blocks the depth pass deals out with `blocks=\"*\"`; **params/subnet** = the largest subnet with "
        "heads + FFN split, then with layers dealt out too; d_model (normalised by LayerNorm/RMSNorm) is "
        "shared in every row (`split_approximate=True` cuts it).",
        "",
        "| model | class | captured | heads | FFN | layers droppable | params/subnet (heads+FFN / +layers) "
        "| full | notes |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        if not r.get("captured"):
            lines.append(f"| {r['model']} | `{r['class']}` | no | - | - | - | - | - | {r.get('error', '')} |")
            continue
        heads = r["heads"] + (f"; {r['heads_detail']}" if r.get("heads_detail") else "")
        if "heads_at_2" in r:
            heads += f"; at S=2: {r['heads_at_2']}"
        if r.get("blocks"):
            layers = f"{len(r['blocks'])}: `{r['block_pattern']}`"
            if r.get("depth_scaling") == "train":
                layers += " (train scaling)"
            depth = f"{r['parameters_per_subnet_depth']:,}"
        else:
            layers = f"no ({r.get('depth_error', 'no droppable block')})"
            depth = "-"
        notes = NOTES.get(r["name"], "")
        if r["diagnostics"]:
            notes = (notes + "; " if notes else "") + "ops without a rule: " + "; ".join(r["diagnostics"][:2])
        lines.append(
            f"| {r['model']} | `{r['class']}` | yes | {_cell(heads)} | {_cell(r['ffn'])} | {_cell(layers)} | "
            f"{r['parameters_per_subnet']:,} / {depth} | {r['parameters_full']:,} | {_cell(notes)} |"
        )
    lines += [
        "",
        "Reading a row: `2/2 groups, 4 units -> 1/1/1/1` means both attention layers' heads are split and "
        "each subnet holds one of the 4 heads of every layer (for grouped-query attention, one KV group with "
        "its 2 query heads). A model with fewer heads or KV groups than subnets keeps them whole in every "
        "subnet, with the reason in the plan (`2 units < 4 subnets`), rather than leave a subnet without "
        "any; the row then shows `shared (...)` and how they split at S = 2. Layers: BERT-style post-LN "
        "layers give two blocks each (attention, FFN); with 2 layers and S = 4, two subnets hold no layer "
        "in a round.",
    ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=list(ZOO), help="just these models; print, write nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for name in args.only or list(ZOO):
        start = time.perf_counter()
        r = row(name, args.subnets)
        rows.append(r)
        print(f"{name:>10}: {time.perf_counter() - start:5.1f}s  heads {r.get('heads')}  ffn {r.get('ffn')}  "
              f"blocks {len(r.get('blocks', []))}", file=sys.stderr, flush=True)
    text = markdown(rows, args.subnets)
    if args.only:
        print(text)
        return rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo.md").write_text(text)
    (args.out / "zoo.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    return rows


if __name__ == "__main__":
    main()
