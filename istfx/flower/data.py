"""Each client's data: its partition of the model file's training set, in seeded batches.

:func:`client_indices` deals the training set among the clients (IID or
Dirichlet label skew, :func:`istfx.runtime.federated_data.dirichlet_label_partition`);
:class:`ClientBatches` iterates one client's samples in batches whose order
depends only on ``(seed, client, epoch)``, starting at any batch position, so
a client process started fresh each round continues where the last one
stopped (the position travels in the client's Flower context).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import default_collate

from istfx.errors import ISTError
from istfx.runtime.data import as_dataset, digits
from istfx.runtime.federated_data import dirichlet_label_partition, labels_of

__all__ = ["ClientBatches", "LoadedModelFile", "client_dataset", "client_indices", "datasets", "labels_of"]


class LoadedModelFile(Protocol):
    """What the apps use of a loaded model file (:class:`istfx.cli.loader.ModelFile`)."""

    model: Any
    example_inputs: Any

    def function(self, name: str) -> Callable | None: ...

    def value(self, name: str, default: Any = None) -> Any: ...


def datasets(loaded: LoadedModelFile, data: str, seed: int) -> tuple[Any, Any]:
    """(train, eval) datasets: the file's ``train_data()``/``eval_data()``, or the digits."""
    train_data = loaded.function("train_data")
    if data == "digits" or train_data is None:
        return digits(seed=seed)
    eval_data = loaded.function("eval_data")
    return (as_dataset(train_data(), "train_data()"),
            as_dataset(eval_data(), "eval_data()") if eval_data else None)


def client_indices(dataset: Any, client: int, clients: int, alpha: float | None, seed: int) -> torch.Tensor:
    """Sample indices of client `client` of `clients` (IID when `alpha` is None)."""
    if not 0 <= client < clients:
        raise ISTError(f"client {client} is not one of the {clients} partitions (partition-id must be in "
                       f"0..{clients - 1}).")
    labels = labels_of(dataset) if alpha is not None else torch.zeros(len(dataset), dtype=torch.int64)
    return dirichlet_label_partition(labels, clients, alpha, seed)[client]


def client_dataset(loaded: LoadedModelFile, data: str, client: int, clients: int, alpha: float | None,
                   seed: int) -> tuple[Any, torch.Tensor]:
    """Client `client`'s training data as ``(dataset, indices into it)``.

    A model file that defines ``client_data(client, clients, seed)`` gives each
    client its own dataset (a split the file knows, e.g. text by document);
    it overrides `alpha`, and every one of its samples is the client's.
    Otherwise the client holds its :func:`client_indices` of the training set
    of :func:`datasets`.
    """
    if not 0 <= client < clients:
        raise ISTError(f"client {client} is not one of the {clients} partitions (partition-id must be in "
                       f"0..{clients - 1}).")
    own = loaded.function("client_data") if data != "digits" else None
    if own is not None:
        dataset = as_dataset(own(client, clients, seed), "client_data()")
        return dataset, torch.arange(len(dataset))
    train, _ = datasets(loaded, data, seed)
    return train, client_indices(train, client, clients, alpha, seed)


class ClientBatches:
    """Batches of one client's samples; epoch ``e`` visits them in an order seeded by ``(seed, client, e)``.

    ``batch(position)`` is the batch at a global position (epoch-major), so a
    run can continue from any position without replaying earlier batches.
    The last partial batch of an epoch is dropped when a full one exists.
    """

    def __init__(self, dataset: Any, indices: torch.Tensor | np.ndarray, batch_size: int, seed: int, client: int) -> None:
        if len(indices) == 0:
            raise ISTError(f"client {client} has no training samples: use fewer clients or a larger alpha.")
        self.dataset = dataset
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.client = int(client)
        n = len(self.indices)
        self.per_epoch = n // batch_size if n >= batch_size else math.ceil(n / batch_size)

    @property
    def samples(self) -> int:
        """Samples this client holds."""
        return len(self.indices)

    def batch(self, position: int) -> Any:
        """The batch at global position `position` (>= 0)."""
        epoch, k = divmod(int(position), self.per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.client * 10_007 + epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=generator)]
        index = order[k * self.batch_size:(k + 1) * self.batch_size]
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:
            return tuple(t[index] for t in tensors)
        return default_collate([self.dataset[int(i)] for i in index])

    def take(self, start: int, count: int) -> list[Any]:
        """`count` batches from position `start`."""
        return [self.batch(start + i) for i in range(count)]
