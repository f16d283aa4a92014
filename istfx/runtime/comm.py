"""Communication for distributed IST: byte accounting and (compressed) packing of slices.

The distributed backends move a round's slices as one flat byte buffer per
destination. :func:`pack` and :func:`unpack` turn a list of tensors into such
a buffer and back; both sides know the shapes and dtypes in advance (they
follow from the shared assignment), so only values travel.

Compression (``compress="int8"`` or ``"int4"``) quantizes every floating
tensor symmetrically with one float32 scale per row (per output channel:
dimension 0 of a tensor with two or more dimensions; groups of
:data:`GROUP` elements for a vector). Integer tensors travel as they are.
The error of each element is at most half its row's scale,
``max|row| / (2 * qmax)`` with ``qmax = 127`` (int8) or ``7`` (int4), and a
row holding NaN or Inf decodes as NaN, so a non-finite update stays visible
to the receiver. ::

    from istfx.runtime import comm

    buffer = comm.pack([w, b], compress="int8")       # uint8 tensor
    w2, b2 = comm.unpack(buffer, comm.specs([w, b]), compress="int8")
    comm.packed_nbytes(comm.specs([w, b]), "int8")    # == buffer.numel()

Accounting helpers give what data-parallel training would move for the
same samples: ring all-reduce sends (and receives) ``2 (W-1)/W`` times the
gradient bytes per rank per step (:func:`ring_allreduce_bytes`).
:func:`byte_comparison` is the one place that sets a round's IST traffic
next to data parallel and local SGD (``fit`` adds it to every metrics row);
:class:`ByteTotals` sums it over a run for summaries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = [
    "ByteTotals",
    "COMPRESS_MODES",
    "GROUP",
    "Spec",
    "Traffic",
    "byte_comparison",
    "data_parallel_bytes",
    "dequantize",
    "local_sgd_bytes",
    "pack",
    "pack_into",
    "packed_nbytes",
    "parse_compress",
    "quantize",
    "quantized_nbytes",
    "ring_allreduce_bytes",
    "specs",
    "tensor_nbytes",
    "unpack",
]

COMPRESS_MODES = ("none", "int8", "int4")
GROUP = 64
"""Elements per scale when a vector (0 or 1 dimensions) is quantized."""

_BITS = {"int8": 8, "int4": 4}


def parse_compress(value: str | None) -> str | None:
    """``None``/``"none"`` -> None; ``"int8"``/``"int4"`` -> itself; anything else raises ValueError."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "none", "off", "fp32", "no"):
        return None
    if text in _BITS:
        return text
    raise ValueError(f"unknown compression {value!r}: use 'none', 'int8' or 'int4'")


# -- accounting ------------------------------------------------------------------------
def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def ring_allreduce_bytes(nbytes: int | float, world: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of `nbytes` over `world` ranks."""
    return 0.0 if world <= 1 else 2.0 * (world - 1) / world * float(nbytes)


def data_parallel_bytes(model_bytes: int, world: int, steps: int) -> float:
    """Per-rank bytes sent by data parallel (one gradient all-reduce per step) over `steps` steps."""
    return steps * ring_allreduce_bytes(model_bytes, world)


def local_sgd_bytes(model_bytes: int, world: int, averages: int = 1) -> float:
    """Per-rank bytes sent by local SGD that averages the full model `averages` times."""
    return averages * ring_allreduce_bytes(model_bytes, world)


def byte_comparison(parameter_bytes: int, world: int, steps: int) -> dict[str, float]:
    """What data parallel and local SGD would move per rank for a round of `steps` local steps.

    The baselines IST is compared with, over the same `world` ranks and
    samples: data parallel all-reduces the gradients (the size of the model's
    parameters) every step; local SGD averages the model once per round.
    Keys (as in ``fit``'s metrics rows): ``ddp_bytes_per_rank``,
    ``local_sgd_bytes_per_rank``, ``model_parameter_bytes``, ``world_size``.
    """
    return {
        "ddp_bytes_per_rank": data_parallel_bytes(parameter_bytes, world, steps),
        "local_sgd_bytes_per_rank": local_sgd_bytes(parameter_bytes, world),
        "model_parameter_bytes": parameter_bytes,
        "world_size": world,
    }


@dataclass
class ByteTotals:
    """IST's bytes per rank summed over a run's metrics rows, next to data parallel and local SGD.

    IST's bytes are those of the busiest rank (``bytes_sent`` of the row);
    rows without them (the local backend moves nothing) count what one ``ps``
    worker would send: its subnet (``measured`` is then False).
    """

    ist: float = 0.0
    data_parallel: float = 0.0
    local_sgd: float = 0.0
    rounds: int = 0
    measured: bool = True

    def add(self, row: dict) -> tuple[float, float]:
        """Count one metrics row; returns the busiest rank's (sent, received) bytes of this round."""
        sent, received = _per_rank(row.get("bytes_sent")), _per_rank(row.get("bytes_received"))
        if sent is None or received is None:
            sent = received = list(row.get("bytes_per_subnet", []))
            self.measured = False
        self.ist += max(sent, default=0)
        self.data_parallel += row.get("ddp_bytes_per_rank") or 0.0
        self.local_sgd += row.get("local_sgd_bytes_per_rank") or 0.0
        self.rounds += 1
        return max(sent, default=0), max(received, default=0)

    @property
    def ratio(self) -> float:
        """How many times more data parallel moves than IST (inf when IST moved nothing)."""
        return self.data_parallel / self.ist if self.ist else math.inf


def _per_rank(value: Any) -> list[float] | None:
    """A row's per-rank byte counts (a list with None for lost ranks, or one rank's number)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(b) for b in value if b is not None]
    return [float(value)]


@dataclass
class Traffic:
    """Bytes one rank sent and received (self-copies excluded)."""

    sent: int = 0
    received: int = 0

    def add(self, sent: int = 0, received: int = 0) -> None:
        self.sent += int(sent)
        self.received += int(received)


# -- quantization ----------------------------------------------------------------------
def _rows(shape: Sequence[int]) -> tuple[int, int, int]:
    """(rows, columns, padding): the 2-D layout a tensor of `shape` is quantized in."""
    numel = math.prod(shape)
    if len(shape) >= 2 and numel:
        return shape[0], numel // shape[0], 0
    rows = max(1, math.ceil(numel / GROUP))
    return rows, GROUP, rows * GROUP - numel


def quantized_nbytes(shape: Sequence[int], bits: int) -> int:
    """Bytes of a quantized tensor of `shape`: float32 scales then the codes."""
    rows, cols, _ = _rows(shape)
    codes = rows * cols if bits == 8 else math.ceil(rows * cols / 2)
    return 4 * rows + codes


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: ``(codes uint8, scales float32[rows])``.

    Codes hold ``round(x / scale) + qmax + 1`` (int8: one per byte; int4: two
    per byte, low nibble first); ``scale = max|row| / qmax``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    qmax = 127 if bits == 8 else 7
    rows, cols, pad = _rows(tuple(x.shape))
    flat = x.detach().reshape(-1).float()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    table = flat.view(rows, cols)
    absmax = table.abs().amax(dim=1)
    absmax = torch.where(torch.isnan(table).any(dim=1), torch.full_like(absmax, math.nan), absmax)
    scales = absmax / qmax
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(table / safe[:, None]).clamp_(-qmax, qmax)
    q = torch.nan_to_num(q, nan=0.0).to(torch.int16).add_(qmax + 1).to(torch.uint8).reshape(-1)
    if bits == 4:
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        q = q[0::2] | (q[1::2] << 4)
    return q, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape: Sequence[int], bits: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to the rounding error)."""
    qmax = 127 if bits == 8 else 7
    rows, cols, pad = _rows(tuple(shape))
    if bits == 4:
        low, high = codes & 0x0F, codes >> 4
        codes = torch.stack([low, high], dim=1).reshape(-1)[: rows * cols]
    values = (codes.to(torch.float32) - (qmax + 1)).view(rows, cols) * scales[:, None]
    values = values.reshape(-1)
    if pad:
        values = values[: rows * cols - pad]
    return values.reshape(tuple(shape)).to(dtype)


# -- packing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """Shape and dtype of one packed tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def specs(tensors: Sequence[torch.Tensor]) -> list[Spec]:
    return [Spec(tuple(t.shape), t.dtype) for t in tensors]


def _segment_nbytes(spec: Spec, compress: str | None) -> int:
    numel = math.prod(spec.shape)
    if compress is not None and spec.dtype.is_floating_point and numel:
        return quantized_nbytes(spec.shape, _BITS[compress])
    return numel * torch.empty((), dtype=spec.dtype).element_size()


def packed_nbytes(tensor_specs: Sequence[Spec], compress: str | None = None) -> int:
    """Size in bytes of :func:`pack`'s buffer for tensors of these specs."""
    compress = parse_compress(compress)
    return sum(_segment_nbytes(s, compress) for s in tensor_specs)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8)


def pack(tensors: Sequence[torch.Tensor], compress: str | None = None,
         device: torch.device | str | None = None) -> torch.Tensor:
    """One uint8 buffer holding `tensors` (quantized when `compress` is set).

    The buffer lives on `device` (default: the first tensor's device, CPU if
    there is none). Segments follow each other without padding: exactly
    :func:`packed_nbytes` bytes.
    """
    compress = parse_compress(compress)
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.empty(packed_nbytes(specs(tensors), compress), dtype=torch.uint8, device=device)
    pack_into(out, tensors, compress)
    return out


def pack_into(out: torch.Tensor, tensors: Sequence[torch.Tensor], compress: str | None = None) -> int:
    """Write `tensors` into the front of the uint8 tensor `out` as :func:`pack` does; returns the bytes written."""
    compress = parse_compress(compress)
    offset = 0
    for t in tensors:
        size = _segment_nbytes(Spec(tuple(t.shape), t.dtype), compress)
        if compress is not None and t.is_floating_point() and t.numel():
            codes, scales = quantize(t, _BITS[compress])
            n_scales = scales.numel() * 4
            out[offset:offset + n_scales].copy_(scales.view(torch.uint8))
            out[offset + n_scales:offset + size].copy_(codes)
        elif size:
            out[offset:offset + size].copy_(_as_bytes(t))
        offset += size
    return offset


def unpack(buffer: torch.Tensor, tensor_specs: Sequence[Spec], compress: str | None = None) -> list[torch.Tensor]:
    """The tensors :func:`pack` put in `buffer` (new tensors on the buffer's device)."""
    compress = parse_compress(compress)
    expected = packed_nbytes(tensor_specs, compress)
    if buffer.numel() != expected or buffer.dtype != torch.uint8:
        raise ValueError(f"buffer holds {buffer.numel()} {buffer.dtype} elements, expected {expected} uint8")
    out = []
    offset = 0
    for spec in tensor_specs:
        size = _segment_nbytes(spec, compress)
        segment = buffer[offset:offset + size]
        if compress is not None and spec.dtype.is_floating_point and math.prod(spec.shape):
            bits = _BITS[compress]
            rows = _rows(spec.shape)[0]
            scales = segment[: 4 * rows].clone().view(torch.float32)
            out.append(dequantize(segment[4 * rows:], scales, spec.shape, bits, spec.dtype))
        else:
            if spec.dtype == torch.bool:
                value = segment.clone().to(torch.bool)
            else:
                value = segment.clone().view(spec.dtype)
            out.append(value.reshape(spec.shape))
        offset += size
    return out
