"""One safetensors file of the full model out of a checkpoint, streamed: never two copies, never a whole tensor.

Works on every checkpoint istfx writes: a sharded DCP checkpoint
(:mod:`istfx.runtime.dcp_checkpoint`, from ``--topology sharded``: a round
directory of ``--checkpoint-dir``, or the directory ``istfx train --save``
writes), and the ``full`` format of the local and ps backends. The file is
written in two passes over the chunks, a block of rows at a time: the first
checks every chunk (header, CRC-32, finite values) and computes each
tensor's CRC-32 for the output's header; the second copies the bytes. Each
tensor's chunks are full-width row blocks, so a tensor's bytes are its
chunks' bytes in row order and the process holds one block (16 MiB) at a
time, whatever the model's size. The output is written atomically and
carries istfx's checksums, so :class:`~istfx.runtime.checkpoint.TensorFile`
(and ``--init-from``) verify it on reading. The older per-rank ``sharded``
format is consolidated in memory first (it holds the whole model once).

Usage::

    from istfx.runtime.export import export
    export("ckpt/", "model.safetensors")          # the newest checkpoint under ckpt/
    save_pretrained("model.safetensors", "hf/", model)   # a Hugging Face model: its own folder
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from istfx.errors import ISTError
from istfx.runtime import checkpoint as ckpt
from istfx.runtime import dcp_checkpoint as dcp

__all__ = ["export", "save_pretrained"]

_CODES = {dtype: code for code, dtype in ckpt._DTYPES.items()}


class _Tensor:
    """Where one output tensor's bytes come from: its chunks in row order."""

    def __init__(self, name: str, shape: list[int], dtype: torch.dtype,
                 chunks: list[tuple[Path, str, dict]]) -> None:
        self.name, self.shape, self.dtype, self.chunks = name, shape, dtype, chunks
        self.nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        self.crc = 0

    def blocks(self) -> Iterator[torch.Tensor]:
        for path, key, chunk in self.chunks:
            yield from dcp.stream_chunk(path, key, chunk)


def _sources(checkpoint: ckpt.Checkpoint) -> list[_Tensor] | None:
    """The output's tensors from `checkpoint` (None: the older sharded format, consolidated instead)."""
    if checkpoint.format == ckpt.SHARDED:
        return None
    out = []
    if checkpoint.format == dcp.FORMAT:
        table = checkpoint.manifest.get("dcp")
        names = checkpoint.manifest.get("model_keys")
        if not isinstance(table, dict) or not isinstance(names, list):
            raise ckpt.CheckpointError(f"{checkpoint.path / ckpt.MANIFEST}: a DCP checkpoint without its chunk table "
                                       "or model names: the manifest is corrupt.")
        for name in names:
            entry = dcp._table_entry(table, name, checkpoint.path)
            dcp._check_tiling(name, entry, checkpoint.path)
            chunks = [(path, name, chunk) for chunk, path in dcp.chunk_pieces(checkpoint.path, table, name)]
            dtype = getattr(torch, entry["dtype"], None)
            if not isinstance(dtype, torch.dtype) or dtype not in _CODES:
                raise ckpt.CheckpointError(f"{checkpoint.path / ckpt.MANIFEST}: {name} has dtype {entry['dtype']!r}, "
                                           "which istfx does not write.")
            out.append(_Tensor(name, list(entry["shape"]), dtype, chunks))
        return out
    path = ckpt.model_file(checkpoint.path)
    with checkpoint.open(path) as handle:
        for name in handle.keys():
            if name not in handle.checksums:
                raise ckpt.CheckpointError(f"{path}: carries no checksum for {name!r}: not a file istfx wrote.")
            dtype, shape, _, _ = handle._info(name)
            chunk = {"sizes": shape, "offsets": [0] * len(shape), "crc32": handle.checksums[name]}
            out.append(_Tensor(name, shape, dtype, [(path, name, chunk)]))
    return out


def _header(tensors: list[_Tensor], metadata: dict) -> bytes:
    body: dict[str, Any] = {"__metadata__": {
        ckpt._META_KEY: json.dumps(metadata),
        ckpt._CRC_KEY: json.dumps({t.name: t.crc for t in tensors}),
    }}
    offset = 0
    for t in tensors:
        body[t.name] = {"dtype": _CODES[t.dtype], "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(body, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text


def export(source: str | os.PathLike | ckpt.Checkpoint, out: str | os.PathLike) -> Path:
    """Write the full model of checkpoint `source` to the safetensors file `out`, streamed.

    `source` is a checkpoint directory (a round directory, a
    ``--checkpoint-dir`` root: its newest complete checkpoint, or the
    directory a sharded ``istfx train --save`` wrote). Every chunk is
    checked; a bad one raises :class:`~istfx.runtime.checkpoint.CheckpointError`
    naming its file, and `out` is left as it was. Returns `out`.
    """
    checkpoint = source if isinstance(source, ckpt.Checkpoint) else ckpt.find(source)
    if checkpoint is None:
        raise ckpt.CheckpointError(f"{os.fspath(source)}: no complete istfx checkpoint there (a complete one has a "
                                   f"{ckpt.MANIFEST}).")
    out = Path(out)
    if out.is_dir():
        raise ISTError(f"--out {out} is a directory: name the safetensors file to write.")
    metadata = {"round": checkpoint.round, "exported_from": str(checkpoint.path)}
    tensors = _sources(checkpoint)
    if tensors is None:
        ckpt.atomic_save(checkpoint.model_state(), out, metadata)
        return out
    tensors.sort(key=lambda t: t.name)
    for t in tensors:  # pass 1: check every chunk, and each tensor's CRC-32 for the header
        crc = 0
        for block in t.blocks():
            if block.numel():
                crc = zlib.crc32(memoryview(block.reshape(-1).view(torch.uint8).numpy()), crc)
        t.crc = crc

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(_header(tensors, metadata))
            for t in tensors:  # pass 2: the bytes, checked again against pass 1
                crc = written = 0
                for block in t.blocks():
                    data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
                    if block.numel():
                        crc = zlib.crc32(data, crc)
                        handle.write(data)
                        written += len(data)
                if crc != t.crc or written != t.nbytes:
                    raise ckpt.CheckpointError(f"{t.chunks[0][0] if t.chunks else checkpoint.path}: {t.name} changed "
                                               "while it was exported: the checkpoint is being written to.")

    ckpt._atomic(out, write)
    return out


def save_pretrained(model_file: str | os.PathLike, directory: str | os.PathLike, model: nn.Module) -> Path:
    """Write `model` (a Hugging Face ``PreTrainedModel``) with the weights of the safetensors file
    `model_file` (an :func:`export`) to `directory` with its own ``save_pretrained``.

    The weights are read into `model` one tensor at a time (each checked);
    tensors tied to an already loaded one are skipped.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise ISTError(f"the model ({type(model).__name__}) has no save_pretrained: --hf-dir is for Hugging Face "
                       "models (transformers' PreTrainedModel); use --out alone.")
    seen: set[int] = set()
    with ckpt.TensorFile(model_file) as handle:
        names = set(handle.keys())
        state = model.state_dict(keep_vars=True)
        missing = [n for n, t in state.items() if n not in names and t.untyped_storage().data_ptr() not in
                   {state[m].untyped_storage().data_ptr() for m in state if m in names}]
        if missing:
            raise ckpt.CheckpointError(f"{model_file}: lacks {', '.join(missing[:4])}: the checkpoint belongs to "
                                       "another model.")
        with torch.no_grad():
            for name, tensor in state.items():
                if name not in names or tensor.untyped_storage().data_ptr() in seen:
                    continue
                handle.read_into(name, tensor.data)
                seen.add(tensor.untyped_storage().data_ptr())
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory
