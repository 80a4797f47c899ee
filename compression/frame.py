"""The versioned, self-describing, checksummed frame that carries tensors.

Layout (all integers little-endian; see ``docs/wire-format.md`` for every byte)::

    header  16 B   magic "FEDG" | u8 version (1, 2 or 3) | u8 kind | u16 flags (0)
                   | u32 body length | u32 compressed length
    body    n B    zstd(tensor records)
    trailer  4 B   u32 CRC-32 of header + compressed body

The decoder trusts nothing: every length, count, index, dtype and scale is checked
before it is used, and every inconsistency raises a :class:`~compression.errors.CodecError`
subclass. A corrupt frame can never produce a wrong tensor silently.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import zstandard

from compression.errors import ChecksumError, CodecError, FrameError, LimitError
from compression.indices import (
    IndexCoding,
    bitpack_decode,
    bitpack_encode,
    from_gaps,
    to_gaps,
    varint_bytes,
    varint_decode,
    varint_encode,
    varint_values,
)
from compression.quantize import ValueType, code_bytes, dequantize_values, quantize_values
from compression.reasons import Reason

MAGIC = b"FEDG"
FORMAT_VERSION = 3
"""Version 2 added bit-packed and varint indices and sign values, version 3 int4 values.

The encoder writes the lowest version that can hold the frame (2 unless it carries int4
values), so coordinators that read only versions 1 and 2 keep accepting such frames
during a rolling upgrade. Frames of every earlier version still decode."""
READABLE_VERSIONS = (1, 2, 3)
_V1_LAYOUTS = (0, 1)
_V1_VALUES = (ValueType.FP32, ValueType.FP16, ValueType.INT8)
_V2_VALUES = (*_V1_VALUES, ValueType.SIGN)
_LAYOUTS = {1: frozenset(_V1_LAYOUTS), 2: frozenset((0, *IndexCoding)), 3: frozenset((0, *IndexCoding))}
_VALUES = {1: {int(v): v for v in _V1_VALUES}, 2: {int(v): v for v in _V2_VALUES}, 3: {int(v): v for v in ValueType}}
_SHAPE_FMT = {n: f"<{n}I" for n in range(1, 9)}
_F32_MAX = float(np.finfo(np.float32).max)
_HEADER = struct.Struct("<4sBBHII")
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")
_CRC = struct.Struct("<I")
MAX_NAME_BYTES = 255
MAX_NDIM = 8
MAX_INT8_BLOCK = 1 << 20
_BATCHED = (ValueType.INT8, ValueType.INT4)
_BATCHABLE = (*_BATCHED, ValueType.FP32)


class FrameKind(IntEnum):
    """What a frame carries."""

    UPDATE = 1  # device -> coordinator: local - global[base]
    GLOBAL_DELTA = 2  # coordinator -> devices: global[v] - global[v-1]
    SNAPSHOT = 3  # coordinator -> devices: the full trainable state at a version


DENSE = 0
"""The layout byte of a dense tensor record; sparse records carry their IndexCoding there."""


class NonFiniteError(FrameError):
    """A frame decodes to NaN or infinite values."""

    reason = Reason.NON_FINITE.value


@dataclass(frozen=True)
class FrameLimits:
    """Bounds the decoder enforces before allocating anything.

    The decompressed body is never larger than ``max_body_bytes`` (the zstd header's
    declared size is checked first, and decompression streams under a hard cap), and the
    tensors a frame declares hold at most ``max_total_numel`` elements together, so that a
    small frame can never make a receiver allocate much more than its limits.
    """

    max_frame_bytes: int = 64 << 20
    max_body_bytes: int = 256 << 20
    max_tensors: int = 4096
    max_numel: int = 1 << 28
    max_total_numel: int = 1 << 28

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, tuple[int, ...]], max_frame_bytes: int) -> FrameLimits:
        """The tightest limits that still admit any frame over tensors of ``shapes``: a dense fp32
        or sparse record of every tensor in any coding (at most 12 bytes an element: a u32 index, a
        per-value scale and a code), names and headers included."""
        numels = [math.prod(int(d) for d in s) for s in shapes.values()] or [1]
        total = int(sum(numels))
        body = 4 + sum(12 * n + 64 + MAX_NAME_BYTES + 4 * MAX_NDIM for n in numels)
        return cls(
            max_frame_bytes=max_frame_bytes,
            max_body_bytes=body,
            max_tensors=max(1, len(shapes)),
            max_numel=max(numels),
            max_total_numel=total,
        )


@dataclass(frozen=True)
class SparseTensor:
    """A tensor given by its shape, sorted flat ``indices`` (``None`` = dense) and ``values``."""

    shape: tuple[int, ...]
    values: np.ndarray
    indices: np.ndarray | None = None

    @classmethod
    def trusted(cls, shape: tuple[int, ...], values: np.ndarray, indices: np.ndarray | None) -> SparseTensor:
        """One built from fields the decoder has already checked, without the dataclass' setters
        (the decoder makes one per record of every update)."""
        t = object.__new__(cls)
        t.__dict__.update(shape=shape, values=values, indices=indices)
        return t

    @property
    def numel(self) -> int:
        return math.prod(int(d) for d in self.shape)

    def to_dense(self) -> np.ndarray:
        """The tensor as a dense float32 array of ``shape``."""
        if self.indices is None:
            return self.values.astype(np.float32, copy=False).reshape(self.shape)
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)


@dataclass(frozen=True, eq=False)
class Packed:
    """Sparse records laid end to end, as the decoder produced them: record ``k`` is tensor
    ``names[k]`` of ``shapes[k]``, with flat ``indices[bounds[k]:bounds[k+1]]`` and the ``values``
    there. Aggregation sums many updates with a few array operations on these instead of a few
    per tensor."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    bounds: np.ndarray
    indices: np.ndarray
    values: np.ndarray


class Tensors(Mapping[str, SparseTensor]):
    """A decoded frame's tensors by name, in record order; read-only.

    The default codec's records are kept as one :class:`Packed` set of arrays (``packed``,
    when every record is of that kind) and each :class:`SparseTensor` is made from them (views)
    the first time it is looked up: a coordinator that only validates and sums an update
    never makes its hundred-odd tensor objects."""

    __slots__ = ("_made", "_order", "_packed", "_packed_at", "packed")

    def __init__(
        self,
        records: Mapping[str, SparseTensor] | None = None,
        packed: Packed | None = None,
        order: list[str] | None = None,
        packed_at: dict[str, int] | None = None,
    ) -> None:
        """``packed_at`` (each packed name's record number) and ``order`` may be shared by every
        frame of one record table: neither is ever changed."""
        self._made: dict[str, SparseTensor] = dict(records or {})
        self.packed = packed if packed is not None and not self._made else None
        if packed_at is None:
            packed_at = {} if packed is None else {n: k for k, n in enumerate(packed.names)}
        self._packed_at = packed_at
        self._packed = packed
        self._order: list[str] = order if order is not None else [*self._made, *(packed.names if packed else ())]

    def __getitem__(self, name: str) -> SparseTensor:
        t = self._made.get(name)
        if t is None:
            k = self._packed_at.get(name)
            if k is None:
                raise KeyError(name)
            p = self._packed
            assert p is not None
            lo, hi = int(p.bounds[k]), int(p.bounds[k + 1])
            t = self._made[name] = SparseTensor.trusted(p.shapes[k], p.values[lo:hi], p.indices[lo:hi])
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._made or name in self._packed_at

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every tensor, without making the tensors."""
        for name in self._order:
            k = self._packed_at.get(name)
            yield (name, self._made[name].shape if k is None else self._packed.shapes[k])  # type: ignore[union-attr]


@dataclass(frozen=True)
class Frame:
    """A decoded frame."""

    kind: FrameKind
    tensors: Mapping[str, SparseTensor] = field(default_factory=dict)
    """By name, in the frame's record order (a :class:`Tensors` when decoded)."""
    sumsq: float = 0.0
    """The sum of the squares of every value, in float64 (the squared L2 norm of the frame)."""

    def dense(self) -> dict[str, np.ndarray]:
        return {name: t.to_dense() for name, t in self.tensors.items()}


def encode_frame(
    kind: FrameKind,
    tensors: Mapping[str, SparseTensor],
    *,
    values: ValueType = ValueType.FP32,
    int8_block: int = 256,
    zstd_level: int = 3,
    index_coding: IndexCoding = IndexCoding.BITPACK,
) -> bytes:
    """Serialize ``tensors`` into one frame. Raises :class:`CodecError` on bad input.

    ``int8_block`` is the number of values per scale for the blockwise types (int8, int4, sign).
    """
    if not 1 <= int8_block <= MAX_INT8_BLOCK:
        raise CodecError(f"int8_block must be in 1..{MAX_INT8_BLOCK}, got {int8_block}")
    parts: list[bytes] = [struct.pack("<I", len(tensors))]
    parts += _encode_records(tensors, values, int8_block, index_coding)
    body = b"".join(parts)
    comp = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(body)
    version = 3 if values is ValueType.INT4 else 2
    header = _HEADER.pack(MAGIC, version, int(kind), 0, len(body), len(comp))
    crc = zlib.crc32(comp, zlib.crc32(header))
    return header + comp + _CRC.pack(crc)


def _encode_record(name: str, t: SparseTensor, vtype: ValueType, block: int, coding: IndexCoding) -> bytes:
    raw_name = name.encode("utf-8")
    if not 1 <= len(raw_name) <= MAX_NAME_BYTES:
        raise CodecError(f"tensor name {name!r} must be 1..{MAX_NAME_BYTES} bytes of UTF-8")
    if not 1 <= len(t.shape) <= MAX_NDIM or any(int(d) < 1 for d in t.shape):
        raise CodecError(f"tensor {name!r} has unsupported shape {t.shape}")
    numel = t.numel
    vals = np.ascontiguousarray(t.values, dtype=np.float32).reshape(-1)
    if t.indices is None:
        layout, index_bytes = DENSE, b""
        if vals.size != numel:
            raise CodecError(f"tensor {name!r}: {vals.size} dense values for shape {t.shape}")
    else:
        layout = int(coding)
        idx = np.asarray(t.indices, dtype=np.int64).reshape(-1)
        if idx.size != vals.size:
            raise CodecError(f"tensor {name!r}: {idx.size} indices but {vals.size} values")
        if idx.size and (idx[0] < 0 or idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
            raise CodecError(f"tensor {name!r}: indices must be strictly increasing in [0, {numel})")
        gaps = to_gaps(idx)
        if coding is IndexCoding.U32:
            index_bytes = gaps.astype("<u4").tobytes()
        elif coding is IndexCoding.BITPACK:
            index_bytes = bitpack_encode(gaps)
        else:
            index_bytes = varint_encode(gaps)
            index_bytes = struct.pack("<I", len(index_bytes)) + index_bytes
    scales, codes = quantize_values(vals, vtype, block)
    return _record_head(name, t.shape, layout, vtype, block, vals.size) + index_bytes + scales + codes


def _record_head(name: str, shape: tuple[int, ...], layout: int, vtype: ValueType, block: int, nnz: int) -> bytes:
    raw_name = name.encode("utf-8")
    head = struct.pack("<H", len(raw_name)) + raw_name
    head += struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *(int(d) for d in shape))
    return head + struct.pack("<BBII", layout, vtype, block if vtype.blockwise else 0, nnz)


def _encode_records(tensors: Mapping[str, SparseTensor], vtype: ValueType, block: int, coding: IndexCoding) -> list[bytes]:
    """Every record's bytes, in order. The common kinds go the fast way, byte for byte the same:
    dense fp32 records (snapshots) with one finiteness check over all, and sparse records with
    varint indices and int8, int4 or fp32 values (updates, global deltas, the sparse parts of
    snapshots) in one vectorized pass. Anything else, or anything that fails a check there,
    goes through :func:`_encode_record`, which names the problem."""
    out: list[bytes | None] = [None] * len(tensors)
    if vtype is ValueType.FP32:
        dense = {k: (name, t) for k, (name, t) in enumerate(tensors.items()) if t.indices is None}
        for k, chunk in zip(dense, _encode_dense_fp32(dict(dense.values())) or [], strict=False):
            out[k] = chunk
    if coding is IndexCoding.VARINT and vtype in _BATCHABLE:
        sparse = {k: (name, t) for k, (name, t) in enumerate(tensors.items()) if t.indices is not None}
        for k, chunk in zip(sparse, _encode_batch(dict(sparse.values()), vtype, block) or [], strict=False):
            out[k] = chunk
    return [
        chunk if chunk is not None else _encode_record(name, t, vtype, block, coding)
        for chunk, (name, t) in zip(out, tensors.items(), strict=True)
    ]


def _encode_dense_fp32(tensors: Mapping[str, SparseTensor]) -> list[bytes] | None:
    """Dense fp32 records, with one finiteness check over all of them; ``None`` if one fails a check."""
    if not tensors:
        return None
    flats = [np.ascontiguousarray(t.values, dtype="<f4").reshape(-1) for t in tensors.values()]
    if not np.isfinite(np.concatenate(flats)).all():
        return None
    out = []
    for (name, t), flat in zip(tensors.items(), flats, strict=True):
        shape = tuple(int(d) for d in t.shape)
        raw = name.encode("utf-8", errors="replace")
        if not 1 <= len(raw) <= MAX_NAME_BYTES or not 1 <= len(shape) <= MAX_NDIM or min(shape) < 1 or flat.size != math.prod(shape):
            return None
        out.append(_record_head(name, shape, DENSE, ValueType.FP32, 0, flat.size) + flat.tobytes())
    return out


def _encode_batch(tensors: Mapping[str, SparseTensor], vtype: ValueType, block: int) -> list[bytes] | None:
    """The records of sparse ``tensors`` with varint indices and int8, int4 or fp32 values, byte
    for byte what :func:`_encode_record` writes, with one vectorized pass over all of them.
    ``None`` when a record is not of that kind or fails a check."""
    items = list(tensors.items())
    if not items or any(t.indices is None for _, t in items):
        return None
    heads = []
    for name, t in items:
        raw = name.encode("utf-8", errors="replace")
        if not 1 <= len(raw) <= MAX_NAME_BYTES or not 1 <= len(t.shape) <= MAX_NDIM or any(int(d) < 1 for d in t.shape):
            return None
        heads.append((name, tuple(int(d) for d in t.shape)))
    index_arrays = [np.asarray(t.indices) for _, t in items]
    if any(i.ndim != 1 or np.size(t.values) != i.size for (_, t), i in zip(items, index_arrays, strict=True)):
        return None
    nnz = np.array([i.size for i in index_arrays], dtype=np.int64)
    total = int(nnz.sum())
    numel = np.array([math.prod(shape) for _, shape in heads], dtype=np.int64)
    idx = np.concatenate(index_arrays).astype(np.int64) if total else np.zeros(0, np.int64)
    vals = np.concatenate([np.asarray(t.values, dtype=np.float32).reshape(-1) for _, t in items]) if total else np.zeros(0, np.float32)
    starts = np.concatenate(([0], np.cumsum(nnz)[:-1]))
    first = np.zeros(total, dtype=bool)
    first[starts[nnz > 0]] = True
    gaps = np.diff(idx, prepend=0)
    gaps[first] = idx[first]
    rec_of = np.repeat(np.arange(len(items)), nnz)
    if total and (gaps.min() < 0 or np.any(gaps[~first] == 0) or np.any(idx >= numel[rec_of]) or not np.all(np.isfinite(vals))):
        return None
    varints, lengths = varint_bytes(gaps.astype(np.uint64))
    idx_len = np.bincount(rec_of, weights=lengths, minlength=len(items)).astype(np.int64) if total else np.zeros(len(items), np.int64)
    if vtype is ValueType.FP32:
        nblocks = np.zeros(len(items), dtype=np.int64)
        scale_bytes, code_len, code_bytes_all = b"", 4 * nnz, vals.astype("<f4").tobytes()
    else:
        # Blockwise quantization, every record's blocks side by side (a record's last block padded).
        qmax = 7 if vtype is ValueType.INT4 else 127
        nblocks = -(-nnz // block)
        block_start = np.concatenate(([0], np.cumsum(nblocks)[:-1]))
        local = np.arange(total, dtype=np.int64) - starts[rec_of]
        slot = block_start[rec_of] * block + local
        padded = np.zeros(int(nblocks.sum()) * block, dtype=np.float32)
        padded[slot] = vals
        blocks = padded.reshape(-1, block)
        scales = (np.abs(blocks).max(axis=1) / np.float32(qmax)).astype(np.float32) if blocks.size else np.zeros(0, np.float32)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        codes = np.clip(np.rint(blocks / safe[:, None]), -qmax, qmax).astype(np.int8).reshape(-1)[slot]
        scale_bytes = scales.astype("<f4").tobytes()
        if vtype is ValueType.INT4:
            code_len = (nnz + 1) // 2
            byte_start = np.concatenate(([0], np.cumsum(code_len)[:-1]))
            nib = np.zeros(2 * int(code_len.sum()), dtype=np.uint8)
            nib[2 * byte_start[rec_of] + local] = (codes.astype(np.int16) & 0xF).astype(np.uint8)
            code_bytes_all = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
        else:
            code_len, code_bytes_all = nnz, codes.tobytes()
    i_end, s_end, c_end = np.cumsum(idx_len).tolist(), np.cumsum(4 * nblocks).tolist(), np.cumsum(code_len).tolist()
    out: list[bytes] = []
    i0 = s0 = c0 = 0
    for k, (name, shape) in enumerate(heads):
        head = _record_head(name, shape, int(IndexCoding.VARINT), vtype, block, int(nnz[k])) + _U32.pack(i_end[k] - i0)
        out.append(head + varints[i0 : i_end[k]] + scale_bytes[s0 : s_end[k]] + code_bytes_all[c0 : c_end[k]])
        i0, s0, c0 = i_end[k], s_end[k], c_end[k]
    return out


_STRUCTS: dict[str, struct.Struct] = {}


def _struct(fmt: str) -> struct.Struct:
    s = _STRUCTS.get(fmt)
    if s is None:
        s = _STRUCTS[fmt] = struct.Struct(fmt)
    return s


class _Reader:
    """A bounds-checked cursor over the decompressed body.

    ``what`` names the field in errors; with ``ref`` it reads ``"<what> <ref>"``, formatted
    only when an error is raised (the decoder runs for every update the coordinator takes).
    """

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = 0

    def take(self, n: int, what: str, ref: object = None) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            label = what if ref is None else f"{what} {ref!r}" if isinstance(ref, str) else f"{what} {ref}"
            raise FrameError(f"frame truncated while reading {label} ({n} bytes at offset {self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str, ref: object = None) -> tuple[int, ...]:
        s = _struct(fmt)
        return s.unpack(self.take(s.size, what, ref))

    def array(self, dtype: str, count: int, what: str, ref: object = None) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what, ref), dtype=dtype, count=count)


def decode_frame(data: bytes, limits: FrameLimits = FrameLimits()) -> Frame:
    """Parse and fully validate a frame. Raises a :class:`CodecError` subclass on any problem."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_frame_bytes:
        raise LimitError(f"frame is {len(data)} bytes, above the limit of {limits.max_frame_bytes}")
    if len(data) < _HEADER.size + _CRC.size:
        raise FrameError(f"frame is {len(data)} bytes, shorter than header and checksum")
    magic, version, kind, flags, body_len, comp_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}; expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise FrameError(f"unsupported frame format version {version}; this decoder reads {READABLE_VERSIONS}")
    if kind not in FrameKind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}")
    if flags != 0:
        raise FrameError(f"unknown frame flags 0x{flags:04x}")
    if comp_len != len(data) - _HEADER.size - _CRC.size:
        raise FrameError(f"compressed length field says {comp_len} bytes, frame holds {len(data) - _HEADER.size - _CRC.size}")
    if body_len > limits.max_body_bytes:
        raise LimitError(f"frame body would be {body_len} bytes, above the limit of {limits.max_body_bytes}")
    comp = data[_HEADER.size : _HEADER.size + comp_len]
    (crc,) = _CRC.unpack_from(data, _HEADER.size + comp_len)
    if zlib.crc32(comp, zlib.crc32(data[: _HEADER.size])) != crc:
        raise ChecksumError("frame checksum mismatch")
    body = _decompress(comp, body_len)
    tensors, sumsq = _decode_body(body, limits, version)
    return Frame(FrameKind(kind), tensors, sumsq)


_CHUNK = 1 << 20


_ONE_SHOT = 1 << 20
_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one may not be used by two threads at once)."""
    d = getattr(_LOCAL, "zstd", None)
    if d is None:
        d = _LOCAL.zstd = zstandard.ZstdDecompressor()
    return d


def _decompress(comp: bytes, body_len: int) -> bytes:
    """Exactly ``body_len`` bytes out of one zstd frame, never allocating more.

    python-zstandard's one-shot ``decompress`` allocates whatever the zstd header declares
    and ignores ``max_output_size`` when a size is declared, so a 411-byte frame can ask
    for 64 GiB. The declared size must equal the (already bounded) body length. A body of up
    to 1 MiB is then decompressed in one call into a buffer of that size (zstd fails rather
    than write past it); a larger one is read as a stream under a hard cap, so that a frame
    whose zstd header lies makes nothing of the declared size.
    """
    try:
        declared = zstandard.frame_content_size(comp)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd frame header is invalid: {exc}") from None
    if declared < 0:
        raise FrameError("zstd frame does not declare its content size (fedge frames always do)")
    if declared != body_len:
        raise FrameError(f"zstd frame declares {declared} bytes, the frame header says {body_len}")
    if body_len <= _ONE_SHOT:  # small enough to allocate as declared: in one call (an update's body)
        try:
            body = _decompressor().decompress(comp)
        except zstandard.ZstdError as exc:
            raise FrameError(f"zstd decompression failed: {exc}") from None
        if len(body) != body_len:
            raise FrameError(f"body is {len(body)} bytes after decompression, header says {body_len}")
        return body
    parts: list[bytes] = []
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(comp, read_across_frames=False) as reader:
            while got <= body_len:
                piece = reader.read(min(_CHUNK, body_len + 1 - got))
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd decompression failed: {exc}") from None
    if got != body_len:
        raise FrameError(f"body is {'more than ' if got > body_len else ''}{got} bytes after decompression, header says {body_len}")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decode_body(body: bytes, limits: FrameLimits, version: int) -> tuple[Tensors, float]:
    r = _Reader(body)
    (count,) = r.unpack("<I", "tensor count")
    if count > limits.max_tensors:
        raise LimitError(f"frame declares {count} tensors, above the limit of {limits.max_tensors}")
    for layout in tuple(_KNOWN):
        parts = layout.walk(body, count, version, limits)
        if parts is not None:
            packed, sq = layout.decode(*parts)
            return Tensors(None, packed, layout.order, layout.at), sq
    decoded: dict[str, SparseTensor] = {}
    order: list[str] = []
    batch = _VarintBatch()
    total_numel = 0
    sumsq = 0.0
    for i in range(count):
        at = r.pos
        head = _read_header(r, i, limits, version)
        total_numel += head.numel
        if total_numel > limits.max_total_numel:
            raise LimitError(f"frame declares more than {limits.max_total_numel} elements in all (at tensor {head.name!r})")
        if head.name in decoded or head.name in batch.seen:
            raise FrameError(f"tensor {head.name!r} appears twice")
        order.append(head.name)
        if head.layout == IndexCoding.VARINT and head.vtype in _BATCHED and head.nnz:
            batch.add(r, head, body[at : r.pos])  # the default codec's records: decoded together below
        else:
            decoded[head.name], sq = _read_payload(r, head)
            sumsq += sq
    if r.pos != len(body):
        raise FrameError(f"{len(body) - r.pos} trailing bytes after the last tensor")
    if not batch.names:
        return Tensors({name: decoded[name] for name in order}), sumsq
    layout = _Layout(batch.heads, None if decoded else batch.head_bytes, version, total_numel)
    packed, sq = layout.decode(
        np.array([h.nnz for h in batch.heads], dtype=np.int64),
        b"".join(batch.idx),
        np.array([len(b) for b in batch.idx], dtype=np.int64),
        np.concatenate(batch.scales),
        np.frombuffer(b"".join(batch.codes), dtype=np.uint8),
    )
    if layout.head_bytes is not None:  # a frame of this table decodes the short way next
        others = [k for k in _KNOWN if k.head_bytes != layout.head_bytes or k.version != version]
        _KNOWN[:] = [layout, *others[: _MAX_KNOWN - 1]]
    return Tensors(decoded, packed, order), sumsq + sq


def _sumsq(values: np.ndarray) -> float:
    """The float64 sum of squares of float32 ``values``. No finite float32 squared overflows float64,
    nor does a sum of 2**28 of them, so the result is finite exactly when every value is."""
    v = values.astype(np.float64)
    return float(np.dot(v, v))


class _Header(NamedTuple):
    name: str
    shape: tuple[int, ...]
    numel: int
    layout: int
    vtype: ValueType
    block: int
    nnz: int


_H = struct.Struct("<H")
_ENCODING = struct.Struct("<BBII")
_PREFIXES: dict[bytes, tuple[str, tuple[int, ...], int]] = {}
"""Name and shape prefixes of record headers already checked, by their bytes: a fleet's frames
repeat the same tensors, so each is parsed once. Bounded by :data:`_MAX_PREFIXES`."""
_MAX_PREFIXES = 8192


def _read_header(r: _Reader, i: int, limits: FrameLimits, version: int) -> _Header:
    buf, pos = r.buf, r.pos
    if pos + 3 > len(buf):
        r.take(3, "name length of tensor", i)  # raises, naming what is missing
    (name_len,) = _H.unpack_from(buf, pos)
    ndim_at = pos + 2 + name_len
    key_end = ndim_at + 1 + 4 * buf[ndim_at] if ndim_at < len(buf) else -1
    cached = _PREFIXES.get(buf[pos:key_end]) if 0 < key_end <= len(buf) else None
    if cached is None:
        name, shape, numel = _read_prefix(r, i)
        if len(_PREFIXES) >= _MAX_PREFIXES:
            _PREFIXES.clear()
        _PREFIXES[buf[pos : r.pos]] = (name, shape, numel)
    else:
        name, shape, numel = cached
        r.pos = key_end
    if numel > limits.max_numel:
        raise LimitError(f"tensor {name!r}: {numel} elements, above the limit of {limits.max_numel}")
    if r.pos + _ENCODING.size > len(buf):
        r.take(_ENCODING.size, "encoding of", name)
    layout, vcode, block, nnz = _ENCODING.unpack_from(buf, r.pos)
    r.pos += _ENCODING.size
    if layout not in _LAYOUTS[version]:
        raise FrameError(f"tensor {name!r}: unknown layout {layout} in a version {version} frame")
    vtype = _VALUES[version].get(vcode)
    if vtype is None:
        raise FrameError(f"tensor {name!r}: unknown value type {vcode} in a version {version} frame")
    if vtype.blockwise:
        if not 1 <= block <= MAX_INT8_BLOCK:
            raise FrameError(f"tensor {name!r}: block size {block} outside 1..{MAX_INT8_BLOCK}")
    elif block != 0:
        raise FrameError(f"tensor {name!r}: block size {block} given for value type {vtype.name}")
    if layout == DENSE:
        if nnz != numel:
            raise FrameError(f"tensor {name!r}: dense with {nnz} values for {numel} elements")
    elif nnz > numel:
        raise FrameError(f"tensor {name!r}: {nnz} sparse values for {numel} elements")
    return _Header(name, shape, numel, layout, vtype, block, nnz)


def _read_prefix(r: _Reader, i: int) -> tuple[str, tuple[int, ...], int]:
    """A record's name and shape, checked."""
    (name_len,) = r.unpack("<H", "name length of tensor", i)
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise FrameError(f"tensor {i}: name length {name_len} outside 1..{MAX_NAME_BYTES}")
    try:
        name = r.take(name_len, "name of tensor", i).decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"tensor {i}: name is not valid UTF-8") from None
    if not name.isprintable():
        raise FrameError(f"tensor {i}: name {name!r} has control characters")
    (ndim,) = r.unpack("<B", "ndim of", name)
    if not 1 <= ndim <= MAX_NDIM:
        raise FrameError(f"tensor {name!r}: ndim {ndim} outside 1..{MAX_NDIM}")
    shape = r.unpack(_SHAPE_FMT[ndim], "shape of", name)
    if any(d < 1 for d in shape):
        raise FrameError(f"tensor {name!r}: shape {shape} has an empty dimension")
    numel = 1
    for d in shape:
        numel *= d
    return name, tuple(shape), numel


def _read_payload(r: _Reader, head: _Header) -> tuple[SparseTensor, float]:
    name, nnz, block, vtype = head.name, head.nnz, head.block, head.vtype
    indices: np.ndarray | None = None
    if head.layout != DENSE:
        indices = from_gaps(_read_gaps(r, IndexCoding(head.layout), nnz, name), head.numel, f"tensor {name!r}")
    scales = None
    if vtype.blockwise:
        scales = r.array("<f4", -(-nnz // block), "scales of", name)
        # One reduction: NaN fails both comparisons, +inf the upper bound, negatives the lower.
        if scales.size and not (scales.min() >= 0 and scales.max() <= _F32_MAX):
            raise FrameError(f"tensor {name!r}: scales must be finite and non-negative")
    codes = r.take(code_bytes(vtype, nnz), "values of", name)
    values = dequantize_values(codes, nnz, scales, vtype, block)
    sq = _sumsq(values)
    if not np.isfinite(sq):
        raise NonFiniteError(f"tensor {name!r}: values are not all finite")
    return SparseTensor(shape=head.shape, values=values, indices=indices), sq


class _VarintBatch:
    """The records of one frame with varint indices and int8/int4 values (the default codec),
    collected as the record table is read, to be decoded together by a :class:`_Layout`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.seen: set[str] = set()
        self.heads: list[_Header] = []
        self.head_bytes: list[bytes] = []
        self.idx: list[bytes] = []
        self.scales: list[np.ndarray] = []
        self.codes: list[bytes] = []

    def add(self, r: _Reader, head: _Header, head_bytes: bytes) -> None:
        name, nnz, buf, pos = head.name, head.nnz, r.buf, r.pos
        if pos + 4 > len(buf):
            r.take(4, "indices of", name)
        (length,) = _U32.unpack_from(buf, pos)
        if length > 5 * nnz:
            raise FrameError(f"indices of {name!r}: {length} varint bytes for {nnz} indices")
        n_scales = -(-nnz // head.block)
        n_codes = nnz if head.vtype is ValueType.INT8 else (nnz + 1) // 2
        a, b, c = pos + 4, pos + 4 + length, pos + 4 + length + 4 * n_scales
        if c + n_codes > len(buf):
            r.pos = a
            r.take(length, "indices of", name)
            r.take(4 * n_scales, "scales of", name)
            r.take(n_codes, "values of", name)
        self.idx.append(buf[a:b])
        self.scales.append(np.frombuffer(buf, dtype="<f4", count=n_scales, offset=b))
        self.codes.append(buf[c : c + n_codes])
        r.pos = c + n_codes
        self.names.append(name)
        self.seen.add(name)
        self.heads.append(head)
        self.head_bytes.append(head_bytes)


_KNOWN: list[_Layout] = []
"""Record tables of frames decoded lately, newest first: a fleet's updates all carry the same
one (but for the value counts), so after the first frame the record headers are compared as
bytes, not parsed. A table costs a few dozen bytes a record."""
_MAX_KNOWN = 4


def _starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


class _Layout:
    """A record table of varint-index, int8/int4-value records (every record of a default-codec
    frame): each record's name, shape and encoding, and what follows from them alone.

    :meth:`decode` checks and decodes one frame's records with a few whole-array operations.
    :meth:`walk` finds them in a body whose records repeat a known table (``head_bytes``: each
    record's header but its value count, which top-k over all tensors sets anew in every
    update), comparing each header with the table's as bytes; on any difference it gives up,
    and the frame is read the long way, which names what is wrong."""

    def __init__(self, heads: list[_Header], head_bytes: list[bytes] | None, version: int, total_numel: int) -> None:
        self.names = tuple(h.name for h in heads)
        self.shapes = tuple(h.shape for h in heads)
        self.order = list(self.names)
        self.at = {n: k for k, n in enumerate(self.names)}
        self.version = version
        self.total_numel = total_numel
        self.max_numel = max(h.numel for h in heads)
        self.numel = np.array([h.numel for h in heads], dtype=np.int64)
        self.records = np.arange(len(heads), dtype=np.int64)
        blocks = {h.block for h in heads}
        self.block: int | np.ndarray = blocks.pop() if len(blocks) == 1 else np.array([h.block for h in heads], dtype=np.int64)
        is4 = np.array([h.vtype is ValueType.INT4 for h in heads])
        self.is4: np.ndarray | None = None if is4.all() or not is4.any() else is4
        self.all4 = bool(is4.all())
        for a in (self.numel, self.records, self.block, is4):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False
        # The walk's table: each header but its last field (the value count), with where that
        # field is, and the record's block size and value type.
        self.head_bytes = None if head_bytes is None else [b[:-4] for b in head_bytes]
        if self.head_bytes is not None:
            self._walk = [(b, len(b), h.numel, h.block, h.vtype is ValueType.INT4) for b, h in zip(self.head_bytes, heads, strict=True)]

    def _fail(self, per_record_bad: np.ndarray, message: str, cls: type[FrameError] = FrameError) -> None:
        bad = np.flatnonzero(per_record_bad)
        if bad.size:
            raise cls(message.format(name=self.names[int(bad[0])]))

    def walk(
        self, body: bytes, count: int, version: int, limits: FrameLimits
    ) -> tuple[np.ndarray, bytes, np.ndarray, np.ndarray, np.ndarray] | None:
        """This frame's value counts, index bytes and their length in each record, scales and
        codes, if its record table is this one; otherwise ``None``."""
        if (
            count != len(self.names)
            or version != self.version
            or self.max_numel > limits.max_numel
            or self.total_numel > limits.max_total_numel
            or not body.startswith(self._walk[0][0], 4)
        ):
            return None
        pos, end, two, same = 4, len(body) - 8, _U32X2.unpack_from, body.startswith
        spans: list[tuple[int, int, int, int, int]] = []
        for head, size, numel, block, int4 in self._walk:
            if not same(head, pos):
                return None
            pos += size
            if pos > end:
                return None
            nnz, length = two(body, pos)
            if not 0 < nnz <= numel or length > 5 * nnz:
                return None
            n_scales = 4 * (-(-nnz // block))
            n_codes = (nnz + 1) >> 1 if int4 else nnz
            spans.append((pos + 8, length, n_scales, n_codes, nnz))
            pos += 8 + length + n_scales + n_codes
        if pos != end + 8:  # every record's bytes lie inside the body, and nothing follows them
            return None
        idx = b"".join([body[a : a + n] for a, n, _, _, _ in spans])
        scale_bytes = b"".join([body[a + n : a + n + k] for a, n, k, _, _ in spans])
        code_bytes = b"".join([body[a + n + k : a + n + k + c] for a, n, k, c, _ in spans])
        counts = np.array(spans, dtype=np.int64)
        return counts[:, 4], idx, counts[:, 1], np.frombuffer(scale_bytes, dtype="<f4"), np.frombuffer(code_bytes, dtype=np.uint8)

    def decode(self, nnz: np.ndarray, idx: bytes, lengths: np.ndarray, scales: np.ndarray, codes: np.ndarray) -> tuple[Packed, float]:
        """Check and decode one frame's records: ``nnz`` values each, ``idx`` every record's
        varint bytes end to end (``lengths`` of them each), ``scales`` and ``codes`` likewise."""
        total = int(nnz.sum())
        starts = _starts(nnz)
        # Indices: one varint stream. Record r holds exactly nnz[r] of them when the value that
        # ends the first nnz[0] + .. + nnz[r] ends exactly at the record's last byte.
        raw = np.frombuffer(idx, dtype=np.uint8)
        byte_end = np.cumsum(lengths)
        ends = np.flatnonzero(raw < 0x80)
        if ends.size != total or np.any(ends[starts + nnz - 1] != byte_end - 1):
            terminal = raw < 0x80
            term_cum = np.concatenate(([0], np.cumsum(terminal)))
            per_record = term_cum[byte_end] - term_cum[byte_end - lengths]
            ends_ok = terminal[byte_end - 1] if raw.size else np.zeros(len(nnz), bool)
            self._fail((per_record != nnz) | ~ends_ok, "indices of {name!r}: varint indices do not hold exactly the declared count")
            raise FrameError("varint indices do not hold exactly the declared counts")
        gaps = varint_values(raw, ends, "varint indices")
        # Strictly increasing within each record: every gap but a record's first is >= 1.
        zero = gaps == 0
        zero[starts] = False
        if zero.any():
            rec = np.searchsorted(starts, np.flatnonzero(zero)[0], side="right") - 1
            raise FrameError(f"tensor {self.names[int(rec)]!r}: indices are not strictly increasing")
        cum = np.cumsum(gaps, dtype=np.int64)
        indices = cum - np.repeat(np.concatenate(([0], cum[starts[1:] - 1])), nnz)
        self._fail(indices[starts + nnz - 1] >= self.numel, "tensor {name!r}: index out of range")
        # Scales: finite and non-negative (NaN fails both comparisons, +inf the upper bound). A
        # record's scale covers `block` values, its last one what is left.
        n_scales = -(-nnz // self.block)
        if scales.size and not (scales.min() >= 0 and scales.max() <= _F32_MAX):
            bad = np.repeat(self.records, n_scales)[~((scales >= 0) & (scales <= _F32_MAX))]
            self._fail(np.bincount(bad, minlength=len(nnz)), "tensor {name!r}: scales must be finite and non-negative")
        covers = np.repeat(np.broadcast_to(self.block, nnz.shape), n_scales)
        covers[np.cumsum(n_scales) - 1] = nnz - (n_scales - 1) * self.block
        # Codes: int8 as is; int4 two a byte, low nibble first, and a record with an odd count
        # pads its last byte with a high nibble that must be 0.
        if self.all4 or self.is4 is not None:
            is4 = self.all4 if self.is4 is None else self.is4
            n_codes = np.where(is4, (nnz + 1) // 2, nnz)
            code_end = np.cumsum(n_codes)
            odd = np.flatnonzero(is4 & (nnz % 2 == 1))
            bad_pad = np.zeros(len(nnz), dtype=bool)
            bad_pad[odd] = (codes[code_end[odd] - 1] >> 4) != 0
            self._fail(bad_pad, "tensor {name!r}: int4 values: the padding nibble is not 0")
        if self.all4:
            nibbles = np.empty(2 * codes.size, dtype=np.uint8)
            nibbles[0::2] = codes & 0xF
            nibbles[1::2] = codes >> 4
            if odd.size:
                keep = np.ones(nibbles.size, dtype=bool)
                keep[2 * code_end[odd] - 1] = False
                nibbles = nibbles[keep]
            signed = (nibbles ^ 8).view(np.int8) - np.int8(8)  # 0..15 -> 0..7, -8..-1
        elif self.is4 is None:
            signed = codes.view(np.int8)
        else:
            rec_of = np.repeat(self.records, nnz)
            local = np.arange(total, dtype=np.int64) - starts[rec_of]
            is4v = self.is4[rec_of]
            picked = codes[(code_end - n_codes)[rec_of] + np.where(is4v, local >> 1, local)]
            nibbles = (((picked >> np.where(is4v, (local & 1) << 2, 0).astype(np.uint8)) & 0xF) ^ 8).view(np.int8) - np.int8(8)
            signed = np.where(is4v, nibbles, picked.view(np.int8))
        values = signed.astype(np.float32) * np.repeat(scales, covers)
        sumsq = _sumsq(values)
        if not np.isfinite(sumsq):
            sums = [values[int(a) : int(a) + int(n)].sum(dtype=np.float64) for a, n in zip(starts, nnz, strict=True)]
            self._fail(~np.isfinite(np.array(sums)), "tensor {name!r}: values are not all finite", NonFiniteError)
        bounds = np.concatenate((starts, [total]))
        return Packed(self.names, self.shapes, bounds, indices, values), sumsq


def _read_gaps(r: _Reader, coding: IndexCoding, nnz: int, name: str) -> np.ndarray:
    if coding is IndexCoding.U32:
        return r.array("<u4", nnz, "indices of", name)
    if coding is IndexCoding.BITPACK:
        (width,) = r.unpack("<B", "indices of", name)
        if width > 32:
            raise FrameError(f"indices of {name!r}: bit width {width} exceeds 32")
        r.pos -= 1
        return bitpack_decode(r.take((nnz * width + 7) // 8 + 1, "indices of", name), nnz, f"indices of {name!r}")
    (length,) = r.unpack("<I", "indices of", name)
    if length > 5 * nnz:
        raise FrameError(f"indices of {name!r}: {length} varint bytes for {nnz} indices")
    return varint_decode(r.take(length, "indices of", name), nnz, f"indices of {name!r}")
