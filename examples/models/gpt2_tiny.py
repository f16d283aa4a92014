"""A tiny GPT-2 (Hugging Face transformers): 2 layers, 4 heads, d_model 64.

    istfx inspect examples/models/gpt2_tiny.py --subnets 4

Attention heads (inside the fused c_attn projection) and the FFN hidden units
are split; d_model, the residual stream normalised by LayerNorm, is shared.
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

config = GPT2Config(
    vocab_size=128,
    n_positions=64,
    n_embd=64,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    use_cache=False,
    bos_token_id=0,
    eos_token_id=0,
)
model = GPT2LMHeadModel(config)
example_inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 16))}
