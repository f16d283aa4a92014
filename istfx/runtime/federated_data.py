"""Federated data: which samples each client holds, built offline and deterministic in a seed.

Two kinds of split:

- :class:`LabelPartition` (and :func:`dirichlet_label_partition`): the
  Dirichlet(α) label partition of any labelled dataset (Hsu, Qi & Brown
  2019). For each class, the shares of its samples that go to each client
  are drawn from Dirichlet(α, ..., α): small α gives each client few classes
  (α = 0.1 is strongly skewed), large α approaches the class mix of the
  whole dataset, and α = ``inf`` (``"iid"``) is a uniform random split into
  equal parts. Every sample lands on exactly one client, every client gets
  at least ``min_samples``, and the per-client label histograms are kept for
  reporting.
- :class:`DocumentSplit` (and :func:`document_partition`): the byte-level
  text task split by source document. A document (one ``help()`` topic of
  ``pydoc_data.topics``, one standard-library source file) goes whole to one
  client or to the held-out validation set, so clients differ the way
  writers do; :class:`ByteWindows` turns a client's bytes into next-byte
  samples ``(x, y)``, ``y`` being ``x`` shifted by one byte.
- :func:`leaf_clients`: datasets that come already split by user, in the
  LEAF benchmark's JSON format (FEMNIST by writer, Shakespeare by speaking
  role); they cannot be downloaded here, so only the format is read.

The same arguments give the same split in every process: the federated
server and each client can rebuild it independently.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from istfx.errors import ISTError

__all__ = [
    "IID",
    "ByteWindows",
    "Document",
    "DocumentSplit",
    "LabelPartition",
    "dirichlet_label_partition",
    "document_partition",
    "labels_of",
    "leaf_clients",
    "parse_alpha",
    "pydoc_topics",
    "stdlib_sources",
    "text_documents",
]

IID = math.inf
"""The concentration α of an IID split: ``parse_alpha("iid")``."""


# -- Dirichlet label partitions ---------------------------------------------------------------------------------


def parse_alpha(value: str | float | None) -> float:
    """A Dirichlet concentration from a flag: ``"iid"``, ``"inf"`` or None is :data:`IID`, else a number > 0."""
    if value is None:
        return IID
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("iid", "inf", "infinity"):
            return IID
        try:
            value = float(text)
        except ValueError:
            raise ISTError(f"Dirichlet alpha must be a number > 0 or 'iid', got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ISTError(f"Dirichlet alpha must be a number > 0 or 'iid', got {value!r}.")
    return float(value)


def labels_of(dataset: Any) -> torch.Tensor:
    """The int64 class labels of a dataset of ``(input, label)`` pairs (a TensorDataset's second tensor
    directly, otherwise read sample by sample)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        labels = tensors[1]
    else:
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ISTError(f"a label partition needs one integer class label per sample, got labels of dtype "
                       f"{labels.dtype} and shape {tuple(labels.shape)}.")
    return labels.long()


def dirichlet_label_partition(labels: Sequence[int] | torch.Tensor, clients: int, alpha: float | str | None,
                              seed: int = 0, *, min_samples: int = 1) -> list[torch.Tensor]:
    """Each client's sample indices (sorted int64 tensors) under a Dirichlet(`alpha`) label partition.

    For every class, its samples (in a seeded random order) are cut into
    `clients` consecutive runs whose lengths follow shares drawn from
    Dirichlet(`alpha`). ``alpha = inf`` (``"iid"``, None) instead deals a seeded
    permutation of all samples into `clients` parts of equal size (±1).
    Afterwards any client under `min_samples` takes random samples, one at a
    time, from the client holding the most, so small α never leaves a
    client empty; the partition stays a partition (every index exactly once).

    Raises:
        ISTError: fewer than ``clients * min_samples`` samples, ``clients < 1``,
            or an `alpha` that is not > 0.
    """
    alpha = parse_alpha(alpha)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ISTError(f"labels must be integer classes, got dtype {labels.dtype}.")
    labels = labels.long()
    n = len(labels)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ISTError(f"clients must be an int >= 1, got {clients!r}.")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        raise ISTError(f"min_samples must be an int >= 0, got {min_samples!r}.")
    if n < clients * min_samples:
        raise ISTError(f"{n} samples cannot give {clients} clients {min_samples} each: use fewer clients.")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    if math.isinf(alpha):
        order = rng.permutation(n)
        for client, chunk in enumerate(np.array_split(order, clients)):
            parts[client] = chunk.tolist()
    else:
        label_array = labels.numpy()
        for cls in np.unique(label_array):
            members = rng.permutation(np.flatnonzero(label_array == cls))
            shares = _dirichlet(rng, alpha, clients)
            cuts = np.round(np.cumsum(shares) * len(members)).astype(np.int64)
            cuts[-1] = len(members)
            start = 0
            for client, stop in enumerate(cuts):
                parts[client].extend(members[start:stop].tolist())
                start = int(stop)
        _top_up(parts, min_samples, rng)
    return [torch.as_tensor(sorted(part), dtype=torch.int64) for part in parts]


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Shares ~ Dirichlet(alpha * 1_k); all gamma draws underflowing to 0 (possible for tiny alpha) gives one-hot."""
    shares = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(shares)) or shares.sum() <= 0:
        shares = np.zeros(k)
        shares[rng.integers(k)] = 1.0
    return shares


def _top_up(parts: list[list[int]], min_samples: int, rng: np.random.Generator) -> None:
    """Move random samples from the largest client to each client holding fewer than `min_samples`."""
    for client in range(len(parts)):
        while len(parts[client]) < min_samples:
            donor = max(range(len(parts)), key=lambda c: (len(parts[c]), -c))
            parts[client].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))


@dataclass(frozen=True)
class LabelPartition:
    """A Dirichlet(α) label partition of a dataset: each client's indices and label histogram.

    Build it with :meth:`of` (a dataset) or :meth:`of_labels` (its labels);
    :meth:`subset` is the dataset a client trains on, :meth:`summary` what a
    report prints.
    """

    indices: tuple[torch.Tensor, ...]
    histograms: torch.Tensor  # [clients, classes] int64
    alpha: float
    seed: int

    @classmethod
    def of_labels(cls, labels: Sequence[int] | torch.Tensor, clients: int, alpha: float | str, seed: int = 0, *,
                  min_samples: int = 1, classes: int | None = None) -> LabelPartition:
        """The partition of samples with these labels (see :func:`dirichlet_label_partition`)."""
        labels = torch.as_tensor(labels).long().reshape(-1)
        indices = dirichlet_label_partition(labels, clients, alpha, seed, min_samples=min_samples)
        classes = int(labels.max()) + 1 if classes is None else classes
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ISTError(f"labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}].")
        histograms = torch.stack([torch.bincount(labels[idx], minlength=classes) for idx in indices])
        return cls(tuple(indices), histograms, parse_alpha(alpha), int(seed))

    @classmethod
    def of(cls, dataset: Any, clients: int, alpha: float | str, seed: int = 0, *, min_samples: int = 1,
           classes: int | None = None) -> LabelPartition:
        """The partition of a dataset of ``(input, label)`` pairs."""
        return cls.of_labels(labels_of(dataset), clients, alpha, seed, min_samples=min_samples, classes=classes)

    @property
    def clients(self) -> int:
        """Number of clients."""
        return len(self.indices)

    @property
    def sizes(self) -> list[int]:
        """Samples per client."""
        return [len(idx) for idx in self.indices]

    def subset(self, dataset: Any, client: int) -> Dataset:
        """Client `client`'s samples of `dataset` (a TensorDataset stays one: one gather per tensor)."""
        if not 0 <= client < self.clients:
            raise ISTError(f"client must lie in [0, {self.clients}), got {client}.")
        index = self.indices[client]
        tensors = getattr(dataset, "tensors", None)
        if tensors is not None:
            return TensorDataset(*(t[index] for t in tensors))
        return Subset(dataset, index.tolist())

    def skew(self) -> float:
        """Mean total-variation distance between a client's label mix and the whole dataset's:
        0 for identical mixes, towards 1 when every client holds classes the others lack."""
        counts = self.histograms.double()
        overall = counts.sum(0) / counts.sum()
        mixes = counts / counts.sum(1, keepdim=True).clamp_min(1)
        return float(0.5 * (mixes - overall).abs().sum(1).mean())

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: α, seed, sizes, histograms, skew and classes held per client."""
        return {
            "alpha": "iid" if math.isinf(self.alpha) else self.alpha,
            "seed": self.seed,
            "clients": self.clients,
            "sizes": self.sizes,
            "histograms": self.histograms.tolist(),
            "classes_per_client": (self.histograms > 0).sum(1).tolist(),
            "skew_tv": round(self.skew(), 4),
        }


# -- the text task, split by document -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One source document of the text corpus: its name and its UTF-8 bytes."""

    name: str
    text: bytes


def pydoc_topics() -> list[Document]:
    """The ``help()`` topics shipped with this Python (``pydoc_data.topics``), one document per topic, by name."""
    from pydoc_data.topics import topics

    return [Document(f"topic:{key}", topics[key].encode("utf-8")) for key in sorted(topics)]


def stdlib_sources(folder: str | Path | None = None) -> list[Document]:
    """The standard library's top-level ``*.py`` files (or those of `folder`), one document per file, by name."""
    if folder is None:
        import sysconfig

        folder = sysconfig.get_paths()["stdlib"]
    files = sorted(Path(folder).glob("*.py"))
    if not files:
        raise ISTError(f"no *.py files in {folder}: pass a folder of Python sources.")
    return [Document(f"stdlib:{path.name}", path.read_bytes()) for path in files]


def text_documents(corpus: str = "topics") -> list[Document]:
    """The offline text corpus by document: ``"topics"`` (the help() pages, as ``examples/gpt_text.py``),
    ``"stdlib"`` (standard-library sources) or ``"both"``."""
    if corpus == "topics":
        return pydoc_topics()
    if corpus == "stdlib":
        return stdlib_sources()
    if corpus == "both":
        return pydoc_topics() + stdlib_sources()
    raise ISTError(f"unknown text corpus {corpus!r}: use 'topics', 'stdlib' or 'both'.")


SEPARATOR = b"\n\n"


def join_documents(documents: Sequence[Document]) -> torch.Tensor:
    """The documents' bytes, joined by a blank line, as an int64 tensor of byte values."""
    data = SEPARATOR.join(doc.text for doc in documents)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class DocumentSplit:
    """Whole documents per client, and the held-out documents the server validates on."""

    clients: tuple[tuple[Document, ...], ...]
    validation: tuple[Document, ...]
    seed: int

    def client_bytes(self, client: int) -> torch.Tensor:
        """Client `client`'s text as byte values (int64)."""
        if not 0 <= client < len(self.clients):
            raise ISTError(f"client must lie in [0, {len(self.clients)}), got {client}.")
        return join_documents(self.clients[client])

    def validation_bytes(self) -> torch.Tensor:
        """The held-out text as byte values (int64)."""
        return join_documents(self.validation)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: bytes and documents per client and held out."""
        return {
            "seed": self.seed,
            "clients": len(self.clients),
            "bytes": [sum(len(d.text) for d in docs) for docs in self.clients],
            "documents": [[d.name for d in docs] for docs in self.clients],
            "validation_bytes": sum(len(d.text) for d in self.validation),
            "validation_documents": [d.name for d in self.validation],
        }


def document_partition(documents: Sequence[Document], clients: int, seed: int = 0, *,
                       val_fraction: float = 0.1, min_bytes: int = 1) -> DocumentSplit:
    """Deal whole documents to `clients` clients, after holding out about `val_fraction` of the bytes.

    The documents are visited in a seeded random order: the first ones are
    held out until they reach `val_fraction` of all bytes (at least one
    document when `val_fraction` > 0); each later one goes to the client
    holding the fewest bytes so far (lowest index on ties), which keeps the
    clients' sizes within one document of each other.

    Raises:
        ISTError: fewer training documents than clients, a client under
            `min_bytes` bytes, or a `val_fraction` outside [0, 1).
    """
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ISTError(f"clients must be an int >= 1, got {clients!r}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ISTError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
    names = [doc.name for doc in documents]
    if len(set(names)) != len(names):
        raise ISTError("documents must have distinct names.")
    order = np.random.default_rng(seed).permutation(len(documents))
    total = sum(len(doc.text) for doc in documents)
    held: list[Document] = []
    held_bytes = 0
    position = 0
    while val_fraction > 0 and position < len(order) and (not held or held_bytes < val_fraction * total):
        doc = documents[order[position]]
        held.append(doc)
        held_bytes += len(doc.text)
        position += 1
    rest = [documents[i] for i in order[position:]]
    if len(rest) < clients:
        raise ISTError(f"{len(rest)} training documents cannot give {clients} clients one each: "
                       "use fewer clients or a larger corpus.")
    loads = [0] * clients
    dealt: list[list[Document]] = [[] for _ in range(clients)]
    for doc in rest:
        client = min(range(clients), key=lambda c: (loads[c], c))
        dealt[client].append(doc)
        loads[client] += len(doc.text)
    if min(loads) < min_bytes:
        raise ISTError(f"a client holds {min(loads)} bytes, under the {min_bytes} needed: use fewer clients.")
    return DocumentSplit(tuple(tuple(docs) for docs in dealt), tuple(held), int(seed))


class ByteWindows(Dataset):
    """Next-byte samples of a byte tensor: sample ``i`` is ``(x, y)`` with ``x = tokens[s : s + block]`` and
    ``y = tokens[s + 1 : s + block + 1]`` for ``s = i * stride``; ``stride`` defaults to ``block_size``
    (non-overlapping windows)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int | None = None) -> None:
        stride = block_size if stride is None else stride
        if block_size < 1 or stride < 1:
            raise ISTError(f"block_size and stride must be >= 1, got {block_size} and {stride}.")
        if len(tokens) < block_size + 1:
            raise ISTError(f"{len(tokens)} bytes cannot make one window of {block_size} + 1 bytes: "
                           "use a smaller block_size or fewer clients.")
        self.tokens = tokens.long()
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self.stride
        row = self.tokens[start:start + self.block_size + 1]
        return row[:-1], row[1:]


# -- LEAF: datasets already split by user ----------------------------------------------------------------------


def leaf_clients(path: str | Path) -> list[tuple[str, TensorDataset]]:
    """Per-user datasets from LEAF JSON files (``{"users", "num_samples", "user_data": {user: {"x", "y"}}}``).

    `path` is one ``.json`` file or a folder of them (read in name order;
    users are listed in file order). Numeric ``x`` rows (FEMNIST's 784
    pixels) become float32 tensors with int64 labels; string ``x`` rows
    (Shakespeare's 80-character windows) become int64 byte values, and a
    one-character string ``y`` its byte value, as the byte-level text task.

    Raises:
        ISTError: no JSON file, a file that is not LEAF's format, a user whose
            ``x`` and ``y`` lengths differ or disagree with ``num_samples``, or
            text outside one byte per character.
    """
    import json

    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ISTError(f"no LEAF JSON files at {path}: pass a .json file or a folder of them.")
    clients: list[tuple[str, TensorDataset]] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            users, counts, user_data = data["users"], data["num_samples"], data["user_data"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ISTError(f"{file.name} is not a LEAF file (users, num_samples, user_data): {exc}") from None
        if len(users) != len(counts):
            raise ISTError(f"{file.name}: {len(users)} users but {len(counts)} num_samples entries.")
        for user, count in zip(users, counts):
            rows = user_data.get(user)
            if rows is None or "x" not in rows or "y" not in rows:
                raise ISTError(f"{file.name}: user {user!r} has no x and y in user_data.")
            x, y = rows["x"], rows["y"]
            if not len(x) == len(y) == count:
                raise ISTError(f"{file.name}: user {user!r} has {len(x)} x, {len(y)} y, num_samples {count}.")
            clients.append((str(user), TensorDataset(_leaf_tensor(x, file, user), _leaf_labels(y, file, user))))
    return clients


def _text_bytes(text: str, file: Path, user: str) -> list[int]:
    codes = [ord(c) for c in text]
    if any(c > 255 for c in codes):
        raise ISTError(f"{file.name}: user {user!r} has a character beyond one byte in {text[:20]!r}.")
    return codes


def _leaf_tensor(x: list, file: Path, user: str) -> torch.Tensor:
    if x and isinstance(x[0], str):
        return torch.tensor([_text_bytes(row, file, user) for row in x], dtype=torch.int64)
    return torch.tensor(x, dtype=torch.float32)


def _leaf_labels(y: list, file: Path, user: str) -> torch.Tensor:
    if y and isinstance(y[0], str):
        return torch.tensor([_text_bytes(label, file, user)[0] for label in y], dtype=torch.int64)
    return torch.tensor(y, dtype=torch.int64)
