"""A tiny Llama (Hugging Face transformers) with grouped-query attention.

    istfx inspect examples/models/llama_tiny.py --subnets 2

2 layers, d_model 64, 4 query heads sharing 2 key/value heads, SwiGLU FFN of
128. Whole KV groups (with their query heads) and FFN hidden units are split;
d_model, normalised by RMSNorm, is shared.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attention_dropout=0.0,
    use_cache=False,
)
model = LlamaForCausalLM(config)
example_inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 16))}
