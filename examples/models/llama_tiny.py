"""A tiny Llama (Hugging Face transformers) with grouped-query attention, trainable with ``istfx train``.

    istfx inspect examples/models/llama_tiny.py --subnets 2
    istfx train examples/models/llama_tiny.py --subnets 2 --rounds 20 --local-steps 10 --optimizer adamw \\
        --lr 3e-3 --weight-decay 0.1 --betas 0.9,0.95 --warmup-steps 20 --lr-schedule cosine \\
        --clip-grad-norm 1.0 --optimizer-state carry --outer-lr 0.7 --outer-momentum 0.9

2 layers, d_model 64, 4 query heads sharing 2 key/value heads, SwiGLU FFN of
128. Whole KV groups (with their query heads) and FFN hidden units are split;
d_model, normalised by RMSNorm, is shared.

Training data: Python's own help() pages (``pydoc_data.topics``, shipped
with CPython, no download) as bytes folded into the 128-token vocabulary;
each subnet slot draws its own random windows, the last 10% of the text is
held out for evaluation. The loss is next-token cross-entropy.
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

CONTEXT, BATCH = 32, 16


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token tensors: the help() pages as bytes, folded into the vocabulary."""
    from pydoc_data.topics import topics

    data = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() % config.vocab_size
    cut = int(len(tokens) * 0.9)
    return tokens[:cut], tokens[cut:]


class _Windows:
    """Re-iterable batches of random windows ``({"input_ids": x}, y)``, y being x shifted by one token."""

    def __init__(self, tokens: torch.Tensor, seed: int, batches: int = 200) -> None:
        self.tokens, self.seed, self.batches, self.passes = tokens, seed, batches, 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
        self.passes += 1
        for _ in range(self.batches):
            start = torch.randint(len(self.tokens) - CONTEXT - 1, (BATCH,), generator=generator)
            rows = torch.stack([self.tokens[s: s + CONTEXT + 1] for s in start.tolist()])
            yield {"input_ids": rows[:, :-1]}, rows[:, 1:]


def train_batches(subnet: int, subnets: int, seed: int):
    """Subnet slot `subnet`'s own stream of training windows."""
    return _Windows(_tokens()[0], seed * 1000 + subnet)


def eval_batches():
    """Consecutive held-out windows, the same every time."""
    held = _tokens()[1]
    n = min(4 * BATCH, (len(held) - 1) // CONTEXT)
    rows = torch.stack([held[i * CONTEXT: i * CONTEXT + CONTEXT + 1] for i in range(n)])
    return [({"input_ids": rows[i:i + BATCH, :-1]}, rows[i:i + BATCH, 1:]) for i in range(0, n, BATCH)]


def loss_fn(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position."""
    logits = outputs["logits"] if not isinstance(outputs, torch.Tensor) else outputs
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
