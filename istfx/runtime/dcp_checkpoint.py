"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own rows, nobody gathers.

A checkpoint of this format (manifest ``"format": "dcp"``) lays every tensor
out in *canonical rows*: in a world of ``n`` ranks, rank ``r`` holds rows
``[r*c, min((r+1)*c, rows))`` of dimension 0, full width, with
``c = ceil(rows / n)`` (``torch.chunk``'s split, that of a DTensor with
``Shard(0)``). Replicated tensors (the ones every rank holds) are written
once. Layout of a round directory::

    round-000009/
      dcp/shard-0000K-model-0000I-of-0000N.safetensors   # rank K-1's rows of tensor I (DCP's files)
      rank-00000.safetensors ...                         # per rank: RNG state and data positions
      manifest.json                                      # last; "dcp": each chunk's file, offsets and CRC-32

**No pickle.** The files are written by DCP's ``HuggingFaceStorageWriter``
(safetensors, one file per rank and tensor, with each chunk's offsets in the
header) and read by its ``HuggingFaceStorageReader``, which rebuilds DCP's
metadata from those headers: there is no pickled ``.metadata`` file.

**Resharding.** A rank loading the checkpoint asks DCP for its canonical
rows under *its* world size; DCP's load planner reads the overlapping parts
of the saved chunks, so a checkpoint written by 4 ranks loads onto 2 or 8.

**Integrity.** The manifest holds the CRC-32 of every chunk. Before DCP
reads anything, a rank reads each chunk it will load, a block of rows at a
time, and checks its header, CRC and finite values; a bad chunk raises
:class:`~istfx.runtime.checkpoint.CheckpointError`, one line naming the file.

Usage (every rank, inside a process group)::

    shards = {"fc.weight": RowShard(my_rows, (4096, 512)), "fc.bias": bias}   # bias: replicated
    table = dcp_checkpoint.save(directory, shards)        # the chunk table (rank 0; None elsewhere)
    dcp_checkpoint.load(directory, table, shards)         # fills the local tensors in place
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from istfx.runtime.checkpoint import CheckpointError, TensorFile, _crc

__all__ = ["DIRECTORY", "FORMAT", "RowShard", "chunk_pieces", "load", "read_tensor", "row_range", "save",
           "verify"]

FORMAT = "dcp"
"""The manifest's ``"format"`` of a checkpoint written by :func:`save`."""
DIRECTORY = "dcp"
"""Sub-directory of a round directory holding DCP's files."""
_SHARDING_KEY = "DCP_SHARDING_INFO"  # DCP's header entry: {key: {"saved_offsets": [...]}}
_BLOCK_BYTES = 16 * 2 ** 20  # rows read at once when checking or streaming a chunk


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Canonical rows ``[start, stop)`` of dimension 0 that `rank` of `world` holds (``torch.chunk``'s split)."""
    step = -(-rows // world) if rows else 0
    return min(rank * step, rows), min((rank + 1) * step, rows)


@dataclass
class RowShard:
    """This rank's canonical rows (:func:`row_range`) of a tensor of full shape `shape`."""

    local: torch.Tensor
    shape: tuple[int, ...]


_MESHES: dict = {}


def _mesh(world: int, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    key = (world, device_type)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (world,))
    return _MESHES[key]


def _as_dcp(state: dict[str, torch.Tensor | RowShard]) -> dict:
    """DCP's state dict: a DTensor (``Shard(0)``) per :class:`RowShard`, plain tensors for replicated ones."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    out = {}
    for key, value in state.items():
        if isinstance(value, RowShard):
            start, stop = row_range(value.shape[0], world, rank)
            if value.local.shape[0] != stop - start or tuple(value.local.shape[1:]) != tuple(value.shape[1:]):
                raise ValueError(f"{key}: rank {rank} holds {tuple(value.local.shape)}, its canonical rows of "
                                 f"{tuple(value.shape)} are {start}:{stop}")
            mesh = _mesh(world, value.local.device.type)
            out[key] = DTensor.from_local(value.local, mesh, [Shard(0)], run_check=False,
                                          shape=torch.Size(value.shape),
                                          stride=torch.empty(value.shape, device="meta").stride())
        else:
            out[key] = value
    return out


# -- saving -----------------------------------------------------------------------------------------
def _writer(folder: Path):
    """DCP's safetensors storage writer, writing each chunk straight from the tensor's memory.

    ``HuggingFaceStorageWriter`` serializes a file's tensors into one bytes
    object before writing it (a second copy of the rank's largest chunk);
    this one writes the same files (one per rank and tensor, the chunk's
    offsets in the header, which ``HuggingFaceStorageReader`` reads) from the
    tensor itself, so saving needs no memory beyond what the rank holds.
    """
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    from istfx.runtime.checkpoint import _DTYPES

    codes = {dtype: code for code, dtype in _DTYPES.items()}

    class _StreamingWriter(HuggingFaceStorageWriter):
        def write_data(self, plan, planner):
            from torch.distributed.checkpoint._hf_utils import (CUSTOM_METADATA_KEY, DCP_VERSION_KEY, FORMAT_KEY,
                                                                FORMAT_VALUE, HF_DCP_VERSION, SAVED_OFFSETS_KEY,
                                                                _gen_file_name)
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            mapping = plan.storage_data.get("fqn_to_index_mapping") or {}
            highest = max(mapping.values(), default=1)
            results = []
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise ValueError(f"{item.index.fqn}: istfx checkpoints hold tensors only")
                tensor = planner.resolve_data(item).detach().to("cpu").contiguous()
                fqn = item.index.fqn
                name = _gen_file_name(mapping.get(fqn, 1), highest, plan.storage_data.get("shard_index"))
                offsets = list(item.tensor_data.chunk.offsets) if item.tensor_data is not None else []
                nbytes = tensor.numel() * tensor.element_size()
                header = {"__metadata__": {CUSTOM_METADATA_KEY: json.dumps({fqn: {SAVED_OFFSETS_KEY: offsets}}),
                                           DCP_VERSION_KEY: str(HF_DCP_VERSION), FORMAT_KEY: FORMAT_VALUE},
                          fqn: {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [0, nbytes]}}
                text = json.dumps(header, separators=(",", ":")).encode("utf-8")
                text += b" " * (-len(text) % 8)
                with open(os.path.join(self.path, name), "wb") as handle:
                    handle.write(len(text).to_bytes(8, "little") + text)
                    if nbytes:
                        handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                    handle.flush()
                    os.fsync(handle.fileno())
                results.append(WriteResult(index=item.index, size_in_bytes=nbytes,
                                           storage_data=_StorageInfo(name, 8 + len(text), nbytes)))
                del tensor
            future: Future = Future()
            future.set_result(results)
            return future

    return _StreamingWriter


def save(directory: str | os.PathLike, state: dict[str, torch.Tensor | RowShard]) -> dict | None:
    """Write `state` under ``directory/dcp`` (every rank calls this with the same keys); no rank gathers.

    Each rank writes its :class:`RowShard` rows; replicated tensors (equal on
    every rank) are written once. Returns, on rank 0, the chunk table for the
    manifest (``{"tensors": {key: {"shape", "dtype", "chunks": [{"file",
    "offsets", "sizes", "crc32"}]}}}``), None on the other ranks.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = Path(directory) / DIRECTORY
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:  # a previous save's files: DCP's reader takes every file in the folder
        for stale in folder.glob("*.safetensors"):
            stale.unlink()
    mine = {}
    for key, value in state.items():
        local = value.local if isinstance(value, RowShard) else value
        if local.numel() == 0 and isinstance(value, RowShard):
            continue
        start = row_range(value.shape[0], world, rank)[0] if isinstance(value, RowShard) else 0
        offsets = [start, *[0] * (local.dim() - 1)] if local.dim() else []
        mine[f"{key}@{offsets}"] = _crc(local.detach().to("cpu").contiguous())
    keys = sorted(state)
    writer = _writer(folder)(str(folder), fqn_to_index_mapping={k: i + 1 for i, k in enumerate(keys)},
                             save_distributed=True)
    dcp.save(_as_dcp(state), storage_writer=writer)
    checksums: list = [None] * world
    dist.all_gather_object(checksums, mine)  # a few integers per rank
    if rank != 0:
        return None
    crcs: dict[str, int] = {}
    for part in checksums:
        crcs.update(part)
    tensors: dict[str, dict] = {}
    for key in keys:
        value = state[key]
        tensors[key] = {"shape": list(value.shape), "chunks": [],
                        "dtype": str((value.local if isinstance(value, RowShard) else value).dtype).replace(
                            "torch.", "")}
    for path in sorted(folder.glob("*.safetensors")):
        with TensorFile(path) as handle:
            sharding = _sharding(handle)
            for key in handle.keys():
                if key not in tensors:
                    raise CheckpointError(f"{path}: holds {key!r}, which this checkpoint did not write.")
                offsets = list(sharding.get(key, {}).get("saved_offsets", [0] * len(handle.shape(key))))
                crc = crcs.get(f"{key}@{offsets}")
                if crc is None:
                    raise CheckpointError(f"{path}: chunk {key}@{offsets} has no checksum from its rank.")
                tensors[key]["chunks"].append({"file": path.name, "offsets": offsets,
                                               "sizes": list(handle.shape(key)), "crc32": crc})
    for key, entry in tensors.items():
        entry["chunks"].sort(key=lambda c: c["offsets"])
        _check_tiling(key, entry, folder)
    return {"tensors": tensors}


def _sharding(handle: TensorFile) -> dict:
    try:
        value = json.loads(handle.metadata.get(_SHARDING_KEY, "{}"))
    except ValueError:
        raise CheckpointError(f"{handle.path}: its {_SHARDING_KEY} header entry is not valid JSON: the file is "
                              "corrupt.") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{handle.path}: its {_SHARDING_KEY} header entry is not a table: the file is corrupt.")
    return value


def _check_tiling(key: str, entry: dict, where: Path) -> None:
    """The chunks of `key` are full-width row blocks covering its rows in order (what :func:`save` writes)."""
    shape = entry["shape"]
    chunks = entry["chunks"]
    if not shape:
        ok = len(chunks) == 1
    else:
        row = 0
        ok = bool(chunks) or shape[0] == 0
        for c in chunks:
            ok = ok and c["offsets"][0] == row and list(c["sizes"][1:]) == list(shape[1:]) and \
                all(o == 0 for o in c["offsets"][1:])
            row += c["sizes"][0]
        ok = ok and row == shape[0]
    if not ok:
        raise CheckpointError(f"{where}: the chunks of {key!r} do not tile its shape {tuple(shape)} by rows: "
                              "the checkpoint is incomplete or corrupt.")


# -- checking and reading ------------------------------------------------------------------------------
def _table_entry(table: dict, key: str, directory: Path) -> dict:
    try:
        return table["tensors"][key]
    except (KeyError, TypeError):
        raise CheckpointError(f"{directory}: the manifest lists no tensor {key!r}: the checkpoint belongs to "
                              "another model or is corrupt.") from None


def chunk_pieces(directory: str | os.PathLike, table: dict, key: str, rows: tuple[int, int] | None = None
                 ) -> Iterator[tuple[dict, Path]]:
    """The chunks (table entries and their files) of tensor `key` overlapping rows ``[start, stop)`` (all: None)."""
    folder = Path(directory) / DIRECTORY
    entry = _table_entry(table, key, Path(directory))
    for chunk in entry["chunks"]:
        if rows is not None and entry["shape"]:
            first, count = chunk["offsets"][0], chunk["sizes"][0]
            if first + count <= rows[0] or first >= rows[1]:
                continue
        name = chunk["file"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CheckpointError(f"{directory}: the manifest names chunk file {name!r}: the manifest is corrupt.")
        yield chunk, folder / name


def stream_chunk(path: Path, key: str, chunk: dict) -> Iterator[torch.Tensor]:
    """The rows of one chunk, a block at a time, checked: header, shape, finite values, then the CRC-32
    (raised after the last block, so a consumer must not trust its output before the iteration ends)."""
    with TensorFile(path) as handle:
        if key not in handle.entries:
            raise CheckpointError(f"{path}: holds no tensor {key!r}; the manifest says it does: the file is not "
                                  "the one this checkpoint wrote.")
        shape = handle.shape(key)
        if list(shape) != list(chunk["sizes"]):
            raise CheckpointError(f"{path}: {key!r} has shape {tuple(shape)}, the manifest {tuple(chunk['sizes'])}: "
                                  "the file is not the one this checkpoint wrote.")
        crc = 0
        if not shape:
            block = handle.rows(key, None)
            crc = zlib.crc32(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
            _check_finite(path, key, block)
            yield block
        else:
            row_bytes = max(1, handle._info(key)[3] // shape[0]) if shape[0] else 1
            step = max(1, _BLOCK_BYTES // row_bytes)
            for a in range(0, shape[0], step):
                block = handle.rows(key, torch.arange(a, min(shape[0], a + step)))  # refuses NaN / Inf
                if block.numel():
                    crc = zlib.crc32(memoryview(block.reshape(-1).view(torch.uint8).numpy()), crc)
                yield block
        if crc != chunk["crc32"]:
            raise CheckpointError(f"{path}: tensor {key!r} fails its checksum (manifest {chunk['crc32']:08x}, read "
                                  f"{crc:08x}): the file is corrupt.")


def _check_finite(path: Path, key: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{path}: tensor {key!r} holds non-finite values (NaN or Inf): refusing to load it.")


def verify(directory: str | os.PathLike, table: dict, wanted: dict[str, tuple[int, int] | None]) -> None:
    """Check every chunk a load of `wanted` (key -> canonical rows, None: all) reads, keeping none of it."""
    for key, rows in wanted.items():
        for chunk, path in chunk_pieces(directory, table, key, rows):
            for _ in stream_chunk(path, key, chunk):
                pass


def load(directory: str | os.PathLike, table: dict, state: dict[str, torch.Tensor | RowShard]) -> None:
    """Fill `state` (every rank, the same keys) from the checkpoint in `directory`, in place, through DCP.

    :class:`RowShard` entries get this rank's canonical rows under the
    current world size (DCP reshards when the checkpoint was written by
    another number of ranks); plain tensors the whole tensor. Every chunk
    read is checked first (:func:`verify`); shapes must match the table.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    directory = Path(directory)
    world, rank = dist.get_world_size(), dist.get_rank()
    wanted: dict[str, tuple[int, int] | None] = {}
    for key, value in state.items():
        entry = _table_entry(table, key, directory)
        if list(entry["shape"]) != list(value.shape):
            raise CheckpointError(f"{directory}: {key} has shape {tuple(entry['shape'])} in the checkpoint, the "
                                  f"model {tuple(value.shape)}: it belongs to another model.")
        wanted[key] = row_range(value.shape[0], world, rank) if isinstance(value, RowShard) else None
    problem = None
    try:
        verify(directory, table, wanted)
    except CheckpointError as exc:
        problem = str(exc)
    problems: list = [None] * world
    dist.all_gather_object(problems, problem)  # every rank stops with the same line, none waits in DCP
    found = next((p for p in problems if p is not None), None)
    if found is not None:
        raise CheckpointError(found)
    # An empty local block reads nothing: DCP skips it (its planner finds no overlapping chunk).
    dcp.load(_as_dcp(state), storage_reader=HuggingFaceStorageReader(str(directory / DIRECTORY)))


def read_tensor(directory: str | os.PathLike, table: dict, key: str, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The whole tensor `key`, assembled from its chunks (checked) on one process, without DCP."""
    entry = _table_entry(table, key, Path(directory))
    dtype = getattr(torch, entry["dtype"])
    shape = tuple(entry["shape"])
    target = torch.empty(shape, dtype=dtype) if out is None else out
    staged = torch.empty(shape, dtype=dtype) if out is not None else target  # written only once all are checked
    for chunk, path in chunk_pieces(directory, table, key):
        row = chunk["offsets"][0] if shape else 0
        for block in stream_chunk(path, key, chunk):
            if shape:
                staged[row:row + block.shape[0]].copy_(block)
                row += block.shape[0]
            else:
                staged.copy_(block)
    if staged is not target:
        with torch.no_grad():
            target.copy_(staged)
    return target
