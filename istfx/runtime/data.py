"""Small real datasets that load offline, for examples, tests and benchmarks.

The data come from scikit-learn's bundled copies, so nothing is downloaded.
scikit-learn is an optional dependency: install it with
``pip install "istfx[data]"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "loaders"]


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
