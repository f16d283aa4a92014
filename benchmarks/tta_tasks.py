"""The two tasks of the time-to-accuracy benchmark: model, per-rank data, optimizer, evaluation.

``mlp``
    The IST paper's wide fully connected net (``ISTMLP``: Linear without bias,
    BatchNorm, ReLU; one hidden layer of 4096 units) on scikit-learn's 8x8
    digits made into a larger task: every training image (75% of the 1797)
    gives ``copies`` randomly rotated (+-15 deg), scaled (0.9-1.1), shifted
    (+-1 px) and noised copies; the test set is the held-out 25% of the
    originals, each in 10 such copies of its own. Seeded, offline. Metric:
    test accuracy.
``gpt``
    The byte-level GPT of ``examples/gpt_text.py`` (``istfx.models.GPT``) on
    ``pydoc_data.topics`` (Python's help() pages); the last 10% is held out.
    Metric: validation loss in nats per byte (next-byte accuracy as well).

Every rank calls :func:`build` with the same arguments and gets the same
initial weights; ``task.batches(rank, world)`` gives the rank's own stream
of training batches, the same whichever method trains.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Task", "augmented_digits", "build"]


@dataclass
class Task:
    """What a worker needs to train and score one model, whatever the method."""

    name: str
    model: nn.Module
    example_inputs: tuple
    batches: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str  # the key of evaluate()'s result the targets refer to
    higher_is_better: bool
    samples_per_batch: int
    info: dict


def _affine_copies(images: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """`copies` random affine + noise versions of each [N, 1, 8, 8] image in [0, 1]: [N * copies, 64]."""
    import torch.nn.functional as F

    x = images.repeat_interleave(copies, dim=0)
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 / 8)  # +-1 pixel in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out + 0.05 * torch.randn(out.shape, generator=generator)
    return out.reshape(n, 64)


def augmented_digits(copies: int = 40, test_copies: int = 10, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits made larger: ``(train, test)`` of standardised [N, 64] inputs and int64 labels.

    The 75/25 split of the originals is seeded by `seed`; training copies
    come from the training originals only, test copies from the held-out
    ones, so no test digit is ever seen in training in any form.
    """
    from sklearn.datasets import load_digits

    if copies < 1 or test_copies < 1:
        raise ValueError(f"copies and test_copies must be >= 1, got {copies} and {test_copies}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(0.25 * len(labels))
    test_idx, train_idx = order[:n_test], order[n_test:]
    generator = torch.Generator().manual_seed(seed + 1)
    x_train = _affine_copies(images[train_idx], copies, generator)
    x_test = _affine_copies(images[test_idx], test_copies, generator)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (TensorDataset((x_train - mean) / std, labels[train_idx].repeat_interleave(copies)),
            TensorDataset((x_test - mean) / std, labels[test_idx].repeat_interleave(test_copies)))


def _mlp(args) -> Task:
    from istfx.runtime.data import ShardBatches
    from istfx.models import ISTMLP
    from istfx.runtime.training import evaluate

    train, test = augmented_digits(copies=args.copies, seed=args.seed)
    torch.manual_seed(args.seed)
    model = ISTMLP(64, [args.hidden], 10)
    test_batches = [(test.tensors[0][i:i + 1024], test.tensors[1][i:i + 1024]) for i in range(0, len(test), 1024)]
    lr, momentum = args.lr, args.momentum

    def batches(rank: int, world: int):
        shard = ShardBatches(train, rank, world, args.batch_size, seed=args.seed)
        while True:
            yield from shard

    def score(m: nn.Module) -> dict[str, float]:
        result = evaluate(m, test_batches)
        return {"accuracy": result["accuracy"], "loss": result["loss"]}

    return Task(
        name="mlp", model=model, example_inputs=(torch.randn(8, 64),), batches=batches,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum),
        loss_fn=torch.nn.functional.cross_entropy, evaluate=score, metric="accuracy", higher_is_better=True,
        samples_per_batch=args.batch_size,
        info={"model": f"ISTMLP(64, [{args.hidden}], 10)", "train_samples": len(train), "test_samples": len(test),
              "optimizer": f"SGD lr {lr} momentum {momentum}", "batch_per_worker": args.batch_size},
    )


def _gpt(args) -> Task:
    sys.path.insert(0, str(ROOT / "examples"))
    from gpt_text import RandomWindows, adamw, fixed_windows, load_text, split_bytes

    from istfx.models import GPT, GPTConfig
    from istfx.models.gpt import lm_loss

    train_tokens, val_tokens = split_bytes(load_text())
    config = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    torch.manual_seed(args.seed)
    model = GPT(config)
    val = fixed_windows(val_tokens, args.block_size, 32, batches=4)

    def batches(rank: int, world: int):
        windows = RandomWindows(train_tokens, args.block_size, args.batch_size, seed=args.seed * 1000 + rank)
        generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
        while True:
            yield windows.batch(generator)

    def score(m: nn.Module) -> dict[str, float]:
        was = m.training
        m.eval()
        loss, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for x, y in val:
                logits = m(x)
                loss += float(lm_loss(logits, y)) * y.numel()
                correct += int((logits.argmax(-1) == y).sum())
                count += y.numel()
        m.train(was)
        return {"val_loss": loss / count, "accuracy": correct / count}

    example = train_tokens[: 2 * (args.block_size // 2)].view(2, args.block_size // 2)
    return Task(
        name="gpt", model=model, example_inputs=(example,), batches=batches, optimizer=adamw(args.lr),
        loss_fn=lm_loss, evaluate=score, metric="val_loss", higher_is_better=False,
        samples_per_batch=args.batch_size,
        info={"model": f"GPT({config.n_layer} layers, {config.n_head} heads, d_model {config.n_embd}, "
                       f"context {config.block_size})", "parameters": model.num_parameters(),
              "train_bytes": len(train_tokens), "val_bytes": len(val_tokens),
              "optimizer": f"AdamW lr {args.lr}", "batch_per_worker": args.batch_size},
    )


def build(args) -> Task:
    """The task named ``args.model`` (``"mlp"`` or ``"gpt"``), built from the seeded arguments."""
    if args.model == "mlp":
        return _mlp(args)
    if args.model == "gpt":
        return _gpt(args)
    raise ValueError(f"unknown model {args.model!r}: use 'mlp' or 'gpt'")
