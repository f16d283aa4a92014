"""The offline digits dataset and its loaders."""

from __future__ import annotations

import pytest
import torch

from istfx.runtime.data import digits, loaders


def test_digits_sizes_and_classes() -> None:
    train, test = digits()
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.25)
    x, y = train.tensors
    assert x.shape == (len(train), 64) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    labels = torch.cat([train.tensors[1], test.tensors[1]])
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_digits_split_is_seeded() -> None:
    a_train, a_test = digits(seed=1)
    b_train, b_test = digits(seed=1)
    c_train, _ = digits(seed=2)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert torch.equal(a_test.tensors[1], b_test.tensors[1])
    assert not torch.equal(a_train.tensors[1], c_train.tensors[1])
    assert len(a_train) + len(a_test) == 1797


def test_digits_standardised_with_train_statistics_only() -> None:
    from sklearn.datasets import load_digits

    train, test = digits(test_fraction=0.3, seed=3)
    x_train, y_train = train.tensors
    x_test, _ = test.tensors

    # Train features are standardised: zero mean, unit std where non-constant.
    raw = torch.as_tensor(load_digits().data, dtype=torch.float32)
    mean_train = x_train.mean(dim=0)
    std_train = x_train.std(dim=0)
    torch.testing.assert_close(mean_train, torch.zeros(64), atol=1e-5, rtol=0)
    nonconstant = std_train > 0
    torch.testing.assert_close(
        std_train[nonconstant], torch.ones(int(nonconstant.sum())), atol=1e-4, rtol=0
    )

    # Recover which raw rows went to the train split and redo the arithmetic.
    n_train = len(train)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(3))
    n_test = 1797 - n_train
    raw_train, raw_test = raw[perm[n_test:]], raw[perm[:n_test]]
    mu, sd = raw_train.mean(dim=0), raw_train.std(dim=0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    torch.testing.assert_close(x_test, (raw_test - mu) / sd)
    # Test statistics are *not* used: the test mean is generally non-zero.
    assert x_test.mean(dim=0).abs().max() > 1e-3
    # Labels follow the same permutation.
    labels = torch.as_tensor(load_digits().target, dtype=torch.int64)
    assert torch.equal(y_train, labels[perm[n_test:]])


def test_digits_images() -> None:
    train, test = digits(image=True)
    x, _ = train.tensors
    assert x.shape == (len(train), 1, 8, 8)
    assert test.tensors[0].shape == (len(test), 1, 8, 8)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.max() == 1.0


def test_digits_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        digits(test_fraction=0.0)
    with pytest.raises(ValueError):
        digits(test_fraction=1.0)


def test_loaders() -> None:
    train, test = digits()
    train_loader, test_loader = loaders(train, test, batch_size=100, seed=7)
    batches = list(train_loader)
    assert sum(len(b[1]) for b in batches) == len(train)
    assert batches[0][0].shape == (100, 64)
    # Test loader keeps dataset order.
    first_x, first_y = next(iter(test_loader))
    assert torch.equal(first_y, test.tensors[1][:100])
    assert torch.equal(first_x, test.tensors[0][:100])
    # Same seed, same shuffle; different seed, different shuffle.
    again, _ = loaders(train, test, batch_size=100, seed=7)
    other, _ = loaders(train, test, batch_size=100, seed=8)
    assert torch.equal(next(iter(again))[1], batches[0][1])
    assert not torch.equal(next(iter(other))[1], batches[0][1])


def test_loaders_drop_last() -> None:
    train, test = digits()
    train_loader, _ = loaders(train, test, batch_size=100, drop_last=True)
    assert all(len(y) == 100 for _, y in train_loader)
