"""Checkpoints of IST runs in safetensors, written atomically; resume continues the same trajectory.

Layout of a checkpoint directory (one per saved round)::

    CKPT/
      latest                      # name of the newest complete checkpoint
      round-000009/               # the state after round 9; training resumes at round 10
        model.safetensors         # "full" format: every parameter and buffer of the model
        rank-00000.safetensors    # per rank: RNG state and data positions; in the
        rank-00001.safetensors    #   "sharded" format also the rank's slices, their
        ...                       #   indices and its share of the idle elements
        manifest.json             # written last: the checkpoint is complete once it exists

Every file is written to a temporary name and moved into place with
``os.replace``, and ``manifest.json`` is written only after every other file
of the round exists, so a run killed while saving leaves the previous
checkpoint intact. :func:`find` returns the newest complete checkpoint.

The assignment of every round is a function of the seed and the round number,
so a checkpoint needs no assignment state: resuming at round ``r + 1`` with the
same seed deals the same units. Together with the saved data positions and
RNG states, a resumed run reproduces an uninterrupted one bit for bit.

Usage::

    from istfx.runtime import checkpoint

    ckpt = checkpoint.find("ckpt/")            # newest complete checkpoint or None
    state = ckpt.model_state()                 # {name: tensor}, sharded ones consolidated
    checkpoint.load_into(ist, ckpt)            # write it into ist.model
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from istfx.errors import ISTError

if TYPE_CHECKING:
    from istfx.core.compiler import ISTModel

__all__ = [
    "Checkpoint",
    "FULL",
    "SHARDED",
    "atomic_save",
    "capture_rng",
    "consolidate",
    "find",
    "load_into",
    "load_state",
    "model_file",
    "prune",
    "rank_file",
    "read_rows",
    "restore_rng",
    "round_dir",
    "TensorFile",
    "save_full",
    "save_rank",
    "write_manifest",
]

FULL = "full"
SHARDED = "sharded"
MANIFEST = "manifest.json"
LATEST = "latest"
_META_KEY = "istfx"


# -- paths -------------------------------------------------------------------------
def round_dir(root: str | os.PathLike, round: int) -> Path:
    """Where the checkpoint taken after `round` lives."""
    return Path(root) / f"round-{round:06d}"


def rank_file(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:05d}.safetensors"


def model_file(directory: str | os.PathLike) -> Path:
    return Path(directory) / "model.safetensors"


# -- atomic writes ---------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `tensors` to a safetensors file: a temporary file, fsync, then ``os.replace``.

    `metadata` (any JSON value) is stored in the file's header under ``"istfx"``.
    """
    from safetensors.torch import save_file

    data = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage()
        if storage.nbytes() != value.numel() * value.element_size() or storage.data_ptr() in seen:
            value = value.clone()  # a view, or a tensor stored under two names: safetensors wants one each
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        data[key] = value
    header = {_META_KEY: json.dumps(metadata if metadata is not None else {})}
    _atomic(Path(path), lambda tmp: save_file(data, tmp, metadata=header))


def _atomic_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic(path, write)


def load_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a safetensors file and its istfx metadata (read, not mapped)."""
    with TensorFile(path) as handle:
        tensors = {name: handle.tensor(name) for name in handle.keys()}
        meta = json.loads(handle.metadata.get(_META_KEY, "{}"))
    return tensors, meta


# -- RNG -------------------------------------------------------------------------------
def capture_rng() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and the current CUDA device when CUDA is in use)."""
    state = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng/cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"].to(torch.uint8))
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"].to(torch.uint8))


# -- writing ---------------------------------------------------------------------------
def model_state(ist: ISTModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer written back on reassembly, by captured name."""
    return {name: ist.state_tensor(name).detach() for name in ist.trainable_state}


def save_full(ist: ISTModel, directory: str | os.PathLike, round: int, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` (the whole model) into `directory`."""
    path = model_file(directory)
    atomic_save(model_state(ist), path, {"round": round, **(metadata or {})})
    return path


def save_rank(directory: str | os.PathLike, rank: int, state: dict[str, Any],
              tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one rank's file: its RNG state, `state` (JSON: data positions, ...) and `tensors`."""
    path = rank_file(directory, rank)
    payload = dict(tensors or {})
    payload.update(capture_rng())
    atomic_save(payload, path, {"rank": rank, **state})
    return path


def write_manifest(root: str | os.PathLike, round: int, manifest: dict, keep: int | None = None) -> Path:
    """Complete the checkpoint of `round`: write its manifest, point ``latest`` at it, prune old ones."""
    directory = round_dir(root, round)
    body = {"round": round, "next_round": round + 1, "written": time.time(), **manifest}
    _atomic_text(directory / MANIFEST, json.dumps(body, indent=2, sort_keys=True))
    _atomic_text(Path(root) / LATEST, directory.name + "\n")
    if keep is not None:
        prune(root, keep)
    return directory


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints under `root`; returns what was removed."""
    done = sorted(_complete(Path(root)))
    removed = []
    for _, path in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# -- reading ---------------------------------------------------------------------------
def _complete(root: Path) -> Iterable[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for path in root.glob("round-*"):
        if (path / MANIFEST).is_file():
            try:
                out.append((int(path.name.split("-", 1)[1]), path))
            except ValueError:
                continue
    return out


def find(path: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint at `path` (a round directory) or the newest complete one under it (a root).

    Returns None when there is none yet (a fresh start).
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return Checkpoint(path)
    latest = path / LATEST
    if latest.is_file():
        candidate = path / latest.read_text(encoding="utf-8").strip()
        if (candidate / MANIFEST).is_file():
            return Checkpoint(candidate)
    done = sorted(_complete(path))
    return Checkpoint(done[-1][1]) if done else None


class Checkpoint:
    """A complete checkpoint directory (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise ISTError(f"{self.path} is not a complete istfx checkpoint (no {MANIFEST}).")
        self.manifest: dict = json.loads(manifest.read_text(encoding="utf-8"))

    @property
    def round(self) -> int:
        return int(self.manifest["round"])

    @property
    def next_round(self) -> int:
        return int(self.manifest["next_round"])

    @property
    def format(self) -> str:
        return self.manifest.get("format", FULL)

    @property
    def world_size(self) -> int:
        return int(self.manifest.get("world_size", 1))

    def rank_path(self, rank: int) -> Path:
        return rank_file(self.path, rank)

    def rank_state(self, rank: int) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(metadata, tensors) of a rank's file, or None when that rank wrote none."""
        path = self.rank_path(rank)
        if not path.is_file():
            return None
        tensors, meta = load_file(path)
        return meta, tensors

    def check(self, *, subnets: int | None = None, seed: int | None = None) -> None:
        """Refuse to resume a run with another number of subnets or another seed."""
        for key, value in (("subnets", subnets), ("seed", seed)):
            saved = self.manifest.get(key)
            if value is not None and saved is not None and int(saved) != int(value):
                raise ISTError(
                    f"checkpoint {self.path} was written with {key}={saved}, this run uses {key}={value}: "
                    "resume with the same settings (the assignment of each round depends on both)."
                )

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state by captured name (sharded checkpoints are consolidated)."""
        if self.format == SHARDED:
            return consolidate(self)
        tensors, _ = load_file(model_file(self.path))
        return tensors

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, round={self.round}, format={self.format!r})"


def load_into(ist: ISTModel, checkpoint: Checkpoint | str | os.PathLike) -> Checkpoint:
    """Copy a checkpoint's model state into ``ist.model`` (in place), one tensor at a time."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else find(checkpoint)
    if ckpt is None:
        raise ISTError(f"no complete checkpoint under {checkpoint}")
    if ckpt.format == SHARDED:
        load_state(ist, ckpt.model_state(), ckpt.path)
        return ckpt
    with TensorFile(model_file(ckpt.path)) as handle:
        load_state(ist, handle, ckpt.path)
    return ckpt


def load_state(ist: ISTModel, state: dict[str, torch.Tensor] | TensorFile, where: Any = "") -> None:
    """Copy `state` (a dict, or an open :class:`TensorFile`) into ``ist.model``'s tensors."""
    keys = set(state.keys())
    missing = [n for n in ist.trainable_state if n not in keys]
    if missing:
        raise ISTError(f"{where or 'the state'} lacks {', '.join(missing[:4])}: it belongs to another model.")
    with torch.no_grad():
        for name in ist.trainable_state:
            target = ist.state_tensor(name)
            if isinstance(state, TensorFile):
                state.read_into(name, target)
                continue
            value = state[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ISTError(f"{where}: {name} has shape {tuple(value.shape)}, the model {tuple(target.shape)}.")
            target.copy_(value)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFile:
    """Reads tensors, or some of their rows, from a safetensors file with plain reads (no mmap).

    Only the bytes asked for are read, and nothing stays mapped into the
    process, so a rank loading its rows of a large model never holds more
    than those rows. ::

        with TensorFile("model.safetensors") as f:
            block = f.rows("fc.weight", torch.tensor([4, 5, 9]))   # rows 4, 5, 9
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        head = os.pread(self._fd, 8, 0)
        if len(head) != 8:
            raise ISTError(f"{self.path} is not a safetensors file.")
        size = int.from_bytes(head, "little")
        header = json.loads(os.pread(self._fd, size, 8))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + size

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def keys(self) -> list[str]:
        return list(self.entries)

    def _info(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        if name not in self.entries:
            raise ISTError(f"{self.path} holds no tensor {name!r}.")
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        return _DTYPES[entry["dtype"]], list(entry["shape"]), self._base + begin, end - begin

    def _read(self, offset: int, count: int, out: torch.Tensor) -> None:
        view = memoryview(out.view(torch.uint8).numpy()) if count else None
        done = 0
        while done < count:
            chunk = os.preadv(self._fd, [view[done:]], offset + done)
            if chunk <= 0:
                raise ISTError(f"{self.path} ends early (truncated file?).")
            done += chunk

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, offset, nbytes = self._info(name)
        out = torch.empty(shape, dtype=dtype)
        self._read(offset, nbytes, out.reshape(-1))
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor `name` straight into `out` (same shape; converted when the dtype differs)."""
        dtype, shape, offset, nbytes = self._info(name)
        if list(out.shape) != shape:
            raise ISTError(f"{self.path}: {name} has shape {tuple(shape)}, expected {tuple(out.shape)}.")
        if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu":
            with torch.no_grad():
                self._read(offset, nbytes, out.detach().reshape(-1))
        else:
            with torch.no_grad():
                out.copy_(self.tensor(name))

    def rows(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        """Rows `rows` of dimension 0, in that order (None: the whole tensor)."""
        if rows is None:
            return self.tensor(name)
        dtype, shape, offset, nbytes = self._info(name)
        if not shape:
            raise ISTError(f"{name} is a scalar: it has no rows.")
        row_bytes = nbytes // shape[0] if shape[0] else 0
        rows = rows.to(torch.long)
        out = torch.empty([len(rows), *shape[1:]], dtype=dtype)
        if len(rows) == 0:
            return out
        unique, inverse = torch.unique(rows, return_inverse=True)
        block = out if len(unique) == len(rows) and torch.equal(unique, rows) else \
            torch.empty([len(unique), *shape[1:]], dtype=dtype)
        flat = block.reshape(len(unique), -1)
        values = unique.tolist()
        start = 0
        for k in range(1, len(values) + 1):  # one read per run of consecutive rows
            if k == len(values) or values[k] != values[k - 1] + 1:
                first = values[start]
                self._read(offset + first * row_bytes, (k - start) * row_bytes, flat[start:k].reshape(-1))
                start = k
        return out if block is out else block.index_select(0, inverse)


def read_rows(source: TensorFile | str | os.PathLike, name: str, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows `rows` (dimension 0, in that order) of tensor `name` of a safetensors file.

    Reads only those rows, so a rank can load its part of a large tensor
    without reading (or mapping) the rest.
    """
    if isinstance(source, TensorFile):
        return source.rows(name, rows)
    with TensorFile(source) as handle:
        return handle.rows(name, rows)


# -- sharded -----------------------------------------------------------------------------
def consolidate(checkpoint: Checkpoint | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Assemble the full model state from a sharded checkpoint, without the model or its code.

    Each rank file holds its slices with their per-dimension indices and its
    share of idle elements (``home/`` rows); rank 0's also holds the shared
    tensors. Homes are written first, then every rank's slices on top.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else find(checkpoint)
    if ckpt is None:
        raise ISTError(f"no complete checkpoint under {checkpoint}")
    if ckpt.format != SHARDED:
        return ckpt.model_state()
    full: dict[str, torch.Tensor] = {}
    slices: list[tuple[str, list, torch.Tensor]] = []
    for rank in range(ckpt.world_size):
        loaded = ckpt.rank_state(rank)
        if loaded is None:
            raise ISTError(f"sharded checkpoint {ckpt.path} lacks the file of rank {rank}.")
        meta, tensors = loaded
        shapes = meta["shapes"]
        dtypes = meta["dtypes"]
        for name, shape in shapes.items():
            if name not in full:
                full[name] = torch.empty(shape, dtype=getattr(torch, dtypes[name]))
        for name, (start, stop) in meta.get("home_rows", {}).items():
            full[name][start:stop].copy_(tensors[f"home/{name}"])
        for name in meta.get("held", []):
            index = [tensors.get(f"index/{name}/{d}") for d in range(len(shapes[name]))]
            slices.append((name, index, tensors[f"held/{name}"]))
        for key, value in tensors.items():
            if key.startswith("shared/"):
                full[key[len("shared/"):]].copy_(value)
    for name, index, value in slices:
        target = full[name]
        out = target
        opened = []
        for d, i in enumerate(index):
            view = [1] * target.dim()
            view[d] = -1
            opened.append((torch.arange(target.shape[d]) if i is None else i).view(view))
        out[tuple(opened)] = value.to(target.dtype)
    return full
