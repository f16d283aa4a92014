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

The sharded topology writes the ``"dcp"`` format instead: no
``model.safetensors``, each rank's rows of every tensor under ``dcp/`` (see
:mod:`istfx.runtime.dcp_checkpoint`), the rank files and the manifest as above.

Every file is written to a temporary name and moved into place with
``os.replace``, and ``manifest.json`` is written only after every other file
of the round exists, so a run killed while saving leaves the previous
checkpoint intact. :func:`find` returns the newest complete checkpoint.

Every file is checked when read: its header is bounds-checked before any
allocation, each tensor's CRC-32 (stored in the file's header and, for the
files of a round, in ``manifest.json``) is verified, and non-finite values are
refused, all before anything is written into the model. A corrupt or foreign
file raises :class:`CheckpointError`, one line naming the file and what is
wrong. Temporary files left by an interrupted save are removed by the next save.

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

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from istfx.errors import ISTError

if TYPE_CHECKING:
    from istfx.core.compiler import ISTModel

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DCP",
    "FULL",
    "SHARDED",
    "atomic_save",
    "atomic_write_text",
    "check_root",
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
    "resumable",
    "remove_stale",
    "round_dir",
    "TensorFile",
    "save_full",
    "save_rank",
    "write_manifest",
]

FULL = "full"
SHARDED = "sharded"
DCP = "dcp"  # torch.distributed.checkpoint, canonical rows (istfx.runtime.dcp_checkpoint)
MANIFEST = "manifest.json"
LATEST = "latest"
_META_KEY = "istfx"
_CRC_KEY = "istfx.crc32"  # header metadata: {tensor name: CRC-32 of its bytes}
_MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the JSON header


class CheckpointError(ISTError):
    """A checkpoint (or safetensors) file is missing, corrupt or not the one its manifest describes."""


def _crc(tensor: torch.Tensor) -> int:
    """CRC-32 of a contiguous CPU tensor's bytes."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))


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
    header = {_META_KEY: json.dumps(metadata if metadata is not None else {}),
              _CRC_KEY: json.dumps({key: _crc(value) for key, value in data.items()})}
    _atomic(Path(path), lambda tmp: save_file(data, tmp, metadata=header))


def _atomic_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a temporary file, fsync, then ``os.replace``)."""
    _atomic_text(Path(path), text)


def load_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a safetensors file and its istfx metadata (read, not mapped)."""
    with TensorFile(path) as handle:
        return handle.load_all()


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
    files = {}
    for path in sorted(directory.glob("*.safetensors")):  # every file of the round that exists now
        with TensorFile(path) as handle:
            files[path.name] = handle.checksums
    body = {"round": round, "next_round": round + 1, "written": time.time(), **manifest, "files": files}
    _atomic_text(directory / MANIFEST, json.dumps(body, indent=2, sort_keys=True))
    _atomic_text(Path(root) / LATEST, directory.name + "\n")
    remove_stale(root, round)
    if keep is not None:
        prune(root, keep)
    return directory


def remove_stale(root: str | os.PathLike, round: int) -> list[Path]:
    """Remove what interrupted saves left under `root` once round `round` is complete.

    That is the temporary files of the root and of complete checkpoints before
    `round`, and incomplete round directories before `round` (nobody writes
    those any more; the current round's directory is left alone, a late rank
    may still be writing into it). Returns what was removed.
    """
    root = Path(root)
    removed = [p for p in root.glob(".*.tmp")]
    for path in root.glob("round-*"):
        try:
            number = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        if number >= round or not path.is_dir():
            continue
        if (path / MANIFEST).is_file():
            removed.extend(path.glob(".*.tmp"))
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in removed:
        if path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
    return removed


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

    Returns None when there is none yet (a fresh start). Raises
    :class:`CheckpointError` when `path` is a file, or the checkpoint's
    manifest is corrupt.
    """
    path = Path(path)
    check_root(path)
    if (path / MANIFEST).is_file():
        return Checkpoint(path)
    latest = path / LATEST
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        candidate = path / name if name and "/" not in name and name not in (".", "..") else None
        if candidate is not None and (candidate / MANIFEST).is_file():
            return Checkpoint(candidate)
    done = sorted(_complete(path))
    return Checkpoint(done[-1][1]) if done else None


def check_root(root: str | os.PathLike) -> None:
    """Refuse a checkpoint directory that is a file (before any work; a missing one is created)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"checkpoint directory {os.fspath(root)} is a file: pass a directory "
                              "(created when missing).")


def resumable(where: str | os.PathLike, *, if_present: bool = False) -> Checkpoint | None:
    """The checkpoint a resume from `where` starts from, its files checked to exist.

    No complete checkpoint at `where` is an error naming it, unless
    `if_present` (then None: start from round 0).
    """
    checkpoint = find(where)
    if checkpoint is None:
        if if_present:
            return None
        state = "does not exist" if not os.path.exists(where) else "holds no complete checkpoint"
        raise CheckpointError(f"resume: {os.fspath(where)} {state} (a complete checkpoint has a manifest.json): "
                              "check the path, train without resume to start from round 0, or resume only "
                              "when a checkpoint is there (resume_if_present=True, --resume-if-present).")
    checkpoint.check()
    return checkpoint


class Checkpoint:
    """A complete checkpoint directory (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(f"{self.path} is not a complete istfx checkpoint (no {MANIFEST}).")
        try:
            body = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{manifest}: not valid JSON ({_one_line(exc)}): the manifest is corrupt; "
                                  f"remove {self.path} to resume from an older checkpoint.") from None
        if not isinstance(body, dict) or not all(
                isinstance(body.get(k), int) and not isinstance(body.get(k), bool) for k in ("round", "next_round")):
            raise CheckpointError(f"{manifest}: not an istfx manifest (no integer 'round' and 'next_round'); "
                                  f"remove {self.path} to resume from an older checkpoint.")
        files = body.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise CheckpointError(f"{manifest}: its 'files' entry is not a table of checksums: the manifest "
                                  "is corrupt.")
        self.manifest: dict = body

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

    def open(self, path: str | os.PathLike) -> TensorFile:
        """Open a file of this checkpoint, checking it is the one the manifest describes."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint {self.path}; restore it, or remove "
                                  f"{self.path} to resume from an older checkpoint.")
        handle = TensorFile(path)
        expected = self.manifest.get("files", {}).get(path.name)
        if expected is not None and handle.checksums != expected:
            handle.close()
            raise CheckpointError(f"{path}: its tensors or their checksums differ from the manifest's: it is "
                                  "not the file this checkpoint wrote (replaced or corrupted).")
        return handle

    def rank_state(self, rank: int) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(metadata, tensors) of a rank's file, or None when the manifest says that rank wrote none
        (a ps worker that had failed). A file the manifest does not excuse is an error when missing."""
        path = self.rank_path(rank)
        if not path.is_file() and rank in self.manifest.get("missing_rank_files", []):
            return None
        if self.format == DCP and rank >= self.world_size:
            return None  # resumed on more ranks than wrote it (DCP reshards): fresh RNG, default data positions
        with self.open(path) as handle:
            tensors, meta = handle.load_all()
        return meta, tensors

    def check(self, *, subnets: int | None = None, seed: int | None = None) -> None:
        """Refuse to resume a run with another number of subnets or another seed, or from a
        checkpoint that lacks a file: the model's, or a rank's the manifest does not excuse."""
        excused = set(self.manifest.get("missing_rank_files", []))
        needed = [Path(self.path, name) for name in self.manifest.get("files", {})]
        if self.format == FULL:
            needed.append(model_file(self.path))
        needed += [self.rank_path(r) for r in range(self.world_size) if r not in excused]
        for path in needed:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from checkpoint {self.path} (resuming needs it: model "
                                      f"state, or a rank's RNG state and data position); restore it, or remove "
                                      f"{self.path} to resume from an older checkpoint.")
        for key, value in (("subnets", subnets), ("seed", seed)):
            if key == "subnets" and self.format == DCP:
                continue  # whole tensors in canonical rows: any number of subnets deals them anew
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
        if self.format == DCP:
            from istfx.runtime import dcp_checkpoint

            table = self.manifest.get("dcp") or {}
            return {name: dcp_checkpoint.read_tensor(self.path, table, name)
                    for name in self.manifest.get("model_keys", [])}
        with self.open(model_file(self.path)) as handle:
            tensors, _ = handle.load_all()
        return tensors

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, round={self.round}, format={self.format!r})"


def load_into(ist: ISTModel, checkpoint: Checkpoint | str | os.PathLike) -> Checkpoint:
    """Copy a checkpoint's model state into ``ist.model`` (in place), one tensor at a time.

    Every tensor is checked (checksum, finite values, shape) before the first
    one is written, so a bad checkpoint leaves the model as it was.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else find(checkpoint)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {checkpoint}")
    if ckpt.format == SHARDED:
        load_state(ist, ckpt.model_state(), ckpt.path)
        return ckpt
    if ckpt.format == DCP:  # tensor by tensor from the chunks, each checked before it is written
        from istfx.runtime import dcp_checkpoint

        table = ckpt.manifest.get("dcp") or {}
        missing = [n for n in ist.trainable_state if n not in (table.get("tensors") or {})]
        if missing:
            raise CheckpointError(f"{ckpt.path} lacks {', '.join(missing[:4])}: it belongs to another model.")
        for name in ist.trainable_state:
            target = ist.state_tensor(name)
            shape = tuple(table["tensors"][name]["shape"])
            if shape != tuple(target.shape):
                raise CheckpointError(f"{ckpt.path}: {name} has shape {shape}, the model {tuple(target.shape)}.")
        dcp_checkpoint.verify(ckpt.path, table, {name: None for name in ist.trainable_state})
        with torch.no_grad():
            for name in ist.trainable_state:
                dcp_checkpoint.read_tensor(ckpt.path, table, name, out=ist.state_tensor(name))
        return ckpt
    with ckpt.open(model_file(ckpt.path)) as handle:
        load_state(ist, handle, handle.path)
    return ckpt


def load_state(ist: ISTModel, state: dict[str, torch.Tensor] | TensorFile, where: Any = "") -> None:
    """Copy `state` (a dict, or an open :class:`TensorFile`) into ``ist.model``'s tensors.

    Names and shapes are checked, and a file's tensors verified, before
    anything is copied: on an error the model is unchanged.
    """
    keys = set(state.keys())
    missing = [n for n in ist.trainable_state if n not in keys]
    if missing:
        raise CheckpointError(f"{where or 'the state'} lacks {', '.join(missing[:4])}: it belongs to another model.")
    for name in ist.trainable_state:
        target = ist.state_tensor(name)
        shape = state.shape(name) if isinstance(state, TensorFile) else tuple(state[name].shape)
        if tuple(shape) != tuple(target.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(shape)}, the model {tuple(target.shape)}.")
    if isinstance(state, TensorFile):
        state.verify(ist.trainable_state)
    with torch.no_grad():
        for name in ist.trainable_state:
            target = ist.state_tensor(name)
            if isinstance(state, TensorFile):
                state.read_into(name, target, verified=True)
            else:
                target.copy_(state[name])


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TensorFile:
    """Reads tensors, or some of their rows, from a safetensors file with plain reads (no mmap).

    Only the bytes asked for are read, and nothing stays mapped into the
    process, so a rank loading its rows of a large model never holds more
    than those rows. ::

        with TensorFile("model.safetensors") as f:
            block = f.rows("fc.weight", torch.tensor([4, 5, 9]))   # rows 4, 5, 9

    The header is checked on opening (its length, every entry's dtype, shape
    and data offsets against the file's size) before anything is allocated;
    a whole tensor read is checked against its CRC-32 when the file carries
    one (files written by :func:`atomic_save` do), and floating tensors with
    NaN or Inf are refused. Problems raise :class:`CheckpointError`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot be opened ({exc.strerror}).") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _parse(self) -> None:
        total = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) != 8:
            raise self._fail(f"{total} bytes, too short for a safetensors file (truncated?).")
        size = int.from_bytes(head, "little")
        if size > total - 8 or size > _MAX_HEADER:
            raise self._fail(f"header length {size} exceeds the file's {total} bytes (or safetensors' limit): "
                             "not a safetensors file, or a corrupt one.")
        try:
            header = json.loads(os.pread(self._fd, size, 8))
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._fail(f"the header is not valid JSON ({_one_line(exc)}): the file is corrupt.") from None
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object: not a safetensors file.")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("the header's __metadata__ is not a table of strings: the file is corrupt.")
        self._base = 8 + size
        data_bytes = total - self._base
        for name, entry in header.items():
            self._check_entry(name, entry, data_bytes)
        self.metadata = metadata
        self.entries = header
        self.checksums: dict[str, int] = {}
        if _CRC_KEY in metadata:
            try:
                checksums = json.loads(metadata[_CRC_KEY])
            except ValueError:
                checksums = None
            if not isinstance(checksums, dict) or set(checksums) != set(header) or \
                    not all(_is_int(v) for v in checksums.values()):
                raise self._fail("its checksum table does not match its tensors: the file is corrupt.")
            self.checksums = checksums

    def _check_entry(self, name: str, entry: Any, data_bytes: int) -> None:
        if not isinstance(entry, dict):
            raise self._fail(f"header entry {name!r} is not an object: the file is corrupt.")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise self._fail(f"tensor {name!r} has dtype {dtype!r}, which istfx does not read "
                             f"({', '.join(_DTYPES)}).")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r} has shape {shape!r}, not a list of sizes: the file is corrupt.")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise self._fail(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]: the file is corrupt.")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise self._fail(f"tensor {name!r} has data_offsets [{begin}, {end}] outside the file's "
                             f"{data_bytes} data bytes (reversed, or a truncated file).")
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._fail(f"tensor {name!r} spans {end - begin} bytes, its shape {tuple(shape)} and dtype "
                             f"{dtype} need {expected}: the file is corrupt.")

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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1])

    @property
    def istfx_metadata(self) -> dict:
        """The JSON value :func:`atomic_save` stored (``{}`` when none)."""
        try:
            meta = json.loads(self.metadata.get(_META_KEY, "{}"))
        except ValueError:
            raise self._fail("its istfx metadata is not valid JSON: the file is corrupt.") from None
        if not isinstance(meta, dict):
            raise self._fail("its istfx metadata is not a JSON object: the file is corrupt.")
        return meta

    def load_all(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor (each verified) and the istfx metadata."""
        meta = self.istfx_metadata
        return {name: self.tensor(name) for name in self.keys()}, meta

    def _info(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        if name not in self.entries:
            raise self._fail(f"holds no tensor {name!r}.")
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        return _DTYPES[entry["dtype"]], list(entry["shape"]), self._base + begin, end - begin

    def _read(self, offset: int, count: int, out: torch.Tensor) -> None:
        view = memoryview(out.view(torch.uint8).numpy()) if count else None
        done = 0
        while done < count:
            chunk = os.preadv(self._fd, [view[done:]], offset + done)
            if chunk <= 0:
                raise self._fail("ends early (truncated file?).")
            done += chunk

    def _check_values(self, name: str, value: torch.Tensor, whole: bool) -> None:
        if whole and name in self.checksums:
            found = _crc(value)
            if found != self.checksums[name]:
                raise self._fail(f"tensor {name!r} fails its checksum (stored {self.checksums[name]:08x}, read "
                                 f"{found:08x}): the file is corrupt.")
        if value.is_floating_point() and value.numel() and \
                not all(torch.isfinite(v) for v in torch.aminmax(value)):  # one fast pass; NaN propagates
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise self._fail(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf): refusing to "
                                 "load it.")

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, checked (checksum, finite values)."""
        dtype, shape, offset, nbytes = self._info(name)
        out = torch.empty(shape, dtype=dtype)
        self._read(offset, nbytes, out.reshape(-1))
        self._check_values(name, out, whole=True)
        return out

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Read and check tensors `names` (default: all) one at a time, keeping none."""
        for name in self.keys() if names is None else names:
            self.tensor(name)

    def read_into(self, name: str, out: torch.Tensor, *, verified: bool = False) -> None:
        """Read tensor `name` straight into `out` (same shape; converted when the dtype differs).

        Unless `verified` (the caller ran :meth:`verify`), the tensor is read and
        checked first, so `out` is only written with good values.
        """
        dtype, shape, offset, nbytes = self._info(name)
        if list(out.shape) != shape:
            raise self._fail(f"{name} has shape {tuple(shape)}, expected {tuple(out.shape)}.")
        if verified and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu":
            with torch.no_grad():
                self._read(offset, nbytes, out.detach().reshape(-1))
        else:
            with torch.no_grad():
                out.copy_(self.tensor(name))

    def rows(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        """Rows `rows` of dimension 0, in that order (None: the whole tensor).

        A whole tensor is checked against its checksum; rows (a part) only for
        finite values.
        """
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
        if int(rows.min()) < 0 or int(rows.max()) >= shape[0]:
            raise self._fail(f"{name} has {shape[0]} rows; asked for rows {int(rows.min())}..{int(rows.max())}.")
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
        self._check_values(name, block, whole=False)
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
            raise CheckpointError(f"{ckpt.rank_path(rank)}: missing from sharded checkpoint {ckpt.path}.")
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
