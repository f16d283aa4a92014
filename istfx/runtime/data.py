"""Training data for IST runs: per-subnet shards, and small real datasets that load offline.

:class:`ShardBatches` gives each subnet slot its own shard of a dataset,
reshuffled every epoch, the same in every process and backend.
:func:`digits` comes from scikit-learn's bundled copy, so nothing is
downloaded; scikit-learn is an optional dependency: install it with
``pip install "istfx[data]"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from istfx.errors import ISTError

__all__ = ["ShardBatches", "as_dataset", "digits", "loaders"]


class ShardBatches:
    """Batches of one subnet's shard of a dataset, reshuffled every epoch.

    The shard of slot `subnet` is every `subnets`-th sample of a permutation
    seeded by `seed` (``shard=False``: the whole dataset). Epoch ``e`` visits
    it in an order seeded by ``(seed, subnet, e)``, so the batches depend
    only on these numbers: any process, any backend, sees the same ones.
    The last partial batch is dropped when the shard holds a full batch
    (batch norm cannot train on one sample).
    """

    def __init__(self, dataset, subnet: int, subnets: int, batch_size: int, seed: int = 0,
                 shard: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ISTError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.indices = order[subnet::subnets] if shard else torch.arange(n)
        if len(self.indices) == 0:
            raise ISTError(f"subnet {subnet} gets no training samples: {n} samples for {subnets} shards.")
        self.dataset = dataset
        self.subnet = subnet
        self.batch_size = batch_size
        self.seed = int(seed)
        self.drop_last = len(self.indices) >= self.batch_size
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.subnet * 10_007 + self.epoch)
        self.epoch += 1
        order = self.indices[torch.randperm(len(self.indices), generator=generator)]
        for k in range(len(self)):
            yield _batch(self.dataset, order[k * self.batch_size:(k + 1) * self.batch_size])


def _batch(dataset, index: torch.Tensor):
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # TensorDataset: one gather per tensor
        return tuple(t[index] for t in tensors)
    return default_collate([dataset[int(i)] for i in index])


def as_dataset(value: Any, what: str = "the training data"):
    """`value` as a dataset of ``(input, label)`` pairs: a dataset as is, a pair of tensors ``(X, Y)`` wrapped."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        return TensorDataset(*value)
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return value
    raise ISTError(f"{what} must be a dataset of (input, label) pairs or a pair of tensors (X, Y), "
                   f"got {type(value).__name__}.")


def _sklearn_datasets() -> Any:
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'istfx.runtime.data needs scikit-learn; install it with: pip install "istfx[data]"'
        ) from exc
    return datasets


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratification-free seeded random split into train and test indices."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    n_test = min(max(n_test, 1), n - 1)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    return perm[n_test:], perm[:n_test]


def digits(
    test_fraction: float = 0.25,
    seed: int = 0,
    image: bool = False,
) -> tuple[TensorDataset, TensorDataset]:
    """The scikit-learn 8x8 handwritten digits (1797 images, 10 classes).

    Args:
        test_fraction: share of the samples held out for testing.
        seed: seed of the random train/test split.
        image: if False, inputs are flat ``[N, 64]`` float32 vectors
            standardised per feature with the *training* mean and standard
            deviation (constant features keep a scale of 1). If True, inputs
            are ``[N, 1, 8, 8]`` float32 images scaled to ``[0, 1]``.

    Returns:
        ``(train, test)`` datasets of ``(inputs, labels)`` with int64 labels.
    """
    bunch = _sklearn_datasets().load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = _split(len(y), test_fraction, seed)
    x_train, x_test = x[train_idx], x[test_idx]

    if image:
        # Pixel intensities in load_digits are integers in [0, 16].
        x_train = (x_train / 16.0).reshape(-1, 1, 8, 8)
        x_test = (x_test / 16.0).reshape(-1, 1, 8, 8)
    else:
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std

    return (
        TensorDataset(x_train, y[train_idx]),
        TensorDataset(x_test, y[test_idx]),
    )


def loaders(
    train: TensorDataset,
    test: TensorDataset,
    batch_size: int = 128,
    seed: int = 0,
    *,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Wrap datasets in data loaders.

    The training loader reshuffles every epoch from a generator seeded with
    ``seed``, so two calls with the same seed yield the same batch order. The
    test loader keeps the dataset order and never drops samples. Set
    ``drop_last=True`` to drop the training loader's last partial batch, e.g.
    when it could hold a single sample, which batch-statistics BatchNorm
    rejects in training mode.
    """
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last
    )
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False)
    return train_loader, test_loader
