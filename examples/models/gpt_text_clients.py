"""A byte-level GPT on Python's help() pages, split by topic for federated clients.

    istfx train examples/models/gpt_text_clients.py --subnets 4 --rounds 20 --optimizer adamw --lr 3e-3

The corpus is ``pydoc_data.topics`` (shipped with CPython, no download), one
document per topic. About 10% of the bytes, as whole topics, are held out for
validation (``eval_data``); ``client_data(client, clients)`` gives client
`client` the topics dealt to it whole
(:func:`istfx.runtime.federated_data.document_partition`), so clients differ
by subject the way real writers do; ``istfx fl`` trains each client on its
``client_data`` (``--dirichlet`` does not apply: the targets are byte
sequences, not labels).
Samples are non-overlapping 64-byte windows with the next byte as target.
2 layers, 4 heads, d_model 64: IST splits heads and MLP units.
"""
import torch
from istfx.models import GPT, GPTConfig
from istfx.models.gpt import lm_loss

from istfx.runtime.federated_data import ByteWindows, document_partition, join_documents, pydoc_topics

BLOCK = 64
SPLIT_SEED = 0

config = GPTConfig(vocab_size=256, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64)


def build_model():
    return GPT(config)


example_inputs = (torch.randint(0, 256, (2, BLOCK)),)
loss_fn = lm_loss


def _held_out():
    return document_partition(pydoc_topics(), 1, seed=SPLIT_SEED).validation


def client_data(client: int, clients: int, seed: int = 0):
    """Client `client`'s windows: the topics dealt to it among `clients` (the split's seed is fixed, so
    the held-out topics never change with the run's seed)."""
    split = document_partition(pydoc_topics(), clients, seed=SPLIT_SEED)
    return ByteWindows(split.client_bytes(client), BLOCK)


def train_data():
    """Every training topic (what a non-federated run trains on)."""
    return client_data(0, 1)


def eval_data():
    """The held-out topics, as windows."""
    return ByteWindows(join_documents(_held_out()), BLOCK)
