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

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import zstandard

from compression.errors import ChecksumError, CodecError, FrameError, LimitError
from compression.indices import (
    IndexCoding,
    bitpack_decode,
    bitpack_encode,
    from_gaps,
    to_gaps,
    varint_decode,
    varint_encode,
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
_CRC = struct.Struct("<I")
MAX_NAME_BYTES = 255
MAX_NDIM = 8
MAX_INT8_BLOCK = 1 << 20


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
        numels = [int(np.prod(s, dtype=np.int64)) for s in shapes.values()] or [1]
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

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_dense(self) -> np.ndarray:
        """The tensor as a dense float32 array of ``shape``."""
        if self.indices is None:
            return self.values.astype(np.float32, copy=False).reshape(self.shape)
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)


@dataclass(frozen=True)
class Frame:
    """A decoded frame."""

    kind: FrameKind
    tensors: dict[str, SparseTensor] = field(default_factory=dict)

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
    for name, t in tensors.items():
        parts.append(_encode_record(name, t, values, int8_block, index_coding))
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
    head = struct.pack("<H", len(raw_name)) + raw_name
    head += struct.pack("<B", len(t.shape)) + struct.pack(f"<{len(t.shape)}I", *(int(d) for d in t.shape))
    head += struct.pack("<BBII", layout, vtype, block if vtype.blockwise else 0, vals.size)
    return head + index_bytes + scales + codes


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
    return Frame(FrameKind(kind), _decode_body(body, limits, version))


_CHUNK = 1 << 20


def _decompress(comp: bytes, body_len: int) -> bytes:
    """Exactly ``body_len`` bytes out of one zstd frame, never allocating more.

    python-zstandard's one-shot ``decompress`` allocates whatever the zstd header declares
    and ignores ``max_output_size`` when a size is declared, so a 411-byte frame can ask
    for 64 GiB. The declared size must equal the (already bounded) body length, and the
    stream is read under a hard cap as well, in case the header lies.
    """
    try:
        declared = zstandard.frame_content_size(comp)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd frame header is invalid: {exc}") from None
    if declared < 0:
        raise FrameError("zstd frame does not declare its content size (fedge frames always do)")
    if declared != body_len:
        raise FrameError(f"zstd frame declares {declared} bytes, the frame header says {body_len}")
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


def _decode_body(body: bytes, limits: FrameLimits, version: int) -> dict[str, SparseTensor]:
    r = _Reader(body)
    (count,) = r.unpack("<I", "tensor count")
    if count > limits.max_tensors:
        raise LimitError(f"frame declares {count} tensors, above the limit of {limits.max_tensors}")
    decoded: dict[str, SparseTensor] = {}
    order: list[str] = []
    batch = _VarintBatch()
    total_numel = 0
    for i in range(count):
        head = _read_header(r, i, limits, version)
        total_numel += head.numel
        if total_numel > limits.max_total_numel:
            raise LimitError(f"frame declares more than {limits.max_total_numel} elements in all (at tensor {head.name!r})")
        if head.name in decoded or head.name in batch.names:
            raise FrameError(f"tensor {head.name!r} appears twice")
        order.append(head.name)
        if head.layout == IndexCoding.VARINT and head.vtype in (ValueType.INT8, ValueType.INT4) and head.nnz:
            batch.add(r, head)  # the default codec's records: decoded together below
        else:
            decoded[head.name] = _read_payload(r, head)
    if r.pos != len(body):
        raise FrameError(f"{len(body) - r.pos} trailing bytes after the last tensor")
    if batch.names:
        decoded.update(batch.decode())
    return {name: decoded[name] for name in order}  # the frame's record order


@dataclass(frozen=True)
class _Header:
    name: str
    shape: tuple[int, ...]
    numel: int
    layout: int
    vtype: ValueType
    block: int
    nnz: int


def _read_header(r: _Reader, i: int, limits: FrameLimits, version: int) -> _Header:
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
    if numel > limits.max_numel:
        raise LimitError(f"tensor {name!r}: {numel} elements, above the limit of {limits.max_numel}")
    layout, vcode, block, nnz = r.unpack("<BBII", "encoding of", name)
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
    return _Header(name, tuple(shape), numel, layout, vtype, block, nnz)


def _read_payload(r: _Reader, head: _Header) -> SparseTensor:
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
    # A float64 sum of float32 values cannot overflow: it is finite exactly when every value is.
    if values.size and not np.isfinite(values.sum(dtype=np.float64)):
        raise NonFiniteError(f"tensor {name!r}: values are not all finite")
    return SparseTensor(shape=head.shape, values=values, indices=indices)


class _VarintBatch:
    """Records with varint indices and int8/int4 values (the default codec), decoded with
    one vectorized pass over all of them instead of a dozen numpy calls per record."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.heads: list[_Header] = []
        self.idx: list[bytes] = []
        self.scales: list[np.ndarray] = []
        self.codes: list[bytes] = []

    def add(self, r: _Reader, head: _Header) -> None:
        name, nnz = head.name, head.nnz
        (length,) = r.unpack("<I", "indices of", name)
        if length > 5 * nnz:
            raise FrameError(f"indices of {name!r}: {length} varint bytes for {nnz} indices")
        self.idx.append(r.take(length, "indices of", name))
        self.scales.append(r.array("<f4", -(-nnz // head.block), "scales of", name))
        self.codes.append(r.take(code_bytes(head.vtype, nnz), "values of", name))
        self.names.append(name)
        self.heads.append(head)

    def _fail(self, per_record_bad: np.ndarray, message: str, cls: type[FrameError] = FrameError) -> None:
        bad = np.flatnonzero(per_record_bad)
        if bad.size:
            raise cls(message.format(name=self.names[int(bad[0])]))

    def decode(self) -> dict[str, SparseTensor]:
        heads = self.heads
        nnz = np.array([h.nnz for h in heads], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(nnz)[:-1]))
        total = int(nnz.sum())
        # Indices: one varint stream, cut at record boundaries.
        raw = np.frombuffer(b"".join(self.idx), dtype=np.uint8)
        lengths = np.array([len(b) for b in self.idx], dtype=np.int64)
        byte_end = np.cumsum(lengths)
        terminal = raw < 0x80
        term_cum = np.concatenate(([0], np.cumsum(terminal)))
        per_record = term_cum[byte_end] - term_cum[byte_end - lengths]
        ends_ok = terminal[byte_end - 1] if raw.size else np.zeros(len(heads), bool)
        self._fail((per_record != nnz) | ~ends_ok, "indices of {name!r}: varint indices do not hold exactly the declared count")
        gaps = varint_decode(raw.tobytes(), total, "varint indices")
        # Strictly increasing within each record: every gap but a record's first is >= 1.
        zero = gaps == 0
        zero[starts] = False
        if zero.any():
            rec = np.searchsorted(starts, np.flatnonzero(zero)[0], side="right") - 1
            raise FrameError(f"tensor {self.names[int(rec)]!r}: indices are not strictly increasing")
        cum = np.cumsum(gaps.astype(np.int64))
        base = np.concatenate(([0], cum[starts[1:] - 1])) if len(heads) > 1 else np.zeros(1, np.int64)
        rec_of = np.repeat(np.arange(len(heads)), nnz)
        indices = cum - base[rec_of]
        last = indices[starts + nnz - 1]
        numel = np.array([h.numel for h in heads], dtype=np.int64)
        self._fail(last >= numel, "tensor {name!r}: index out of range")
        # Scales: finite and non-negative.
        scales = np.concatenate(self.scales)
        if scales.size and not (scales.min() >= 0 and scales.max() <= _F32_MAX):
            bad = np.array([bool(s.size and not (s.min() >= 0 and s.max() <= _F32_MAX)) for s in self.scales])
            self._fail(bad, "tensor {name!r}: scales must be finite and non-negative")
        # Codes: int8 as is; int4 nibbles unpacked for all records at once. A record with an
        # odd count pads its last byte with a nibble that must be 0.
        codes = np.empty(total, dtype=np.int8)
        is4 = np.array([h.vtype is ValueType.INT4 for h in heads])
        for want4 in (False, True):
            sel = np.flatnonzero(is4 == want4)
            if not sel.size:
                continue
            raw_codes = np.frombuffer(b"".join(self.codes[int(k)] for k in sel), dtype=np.uint8)
            rec = np.repeat(sel, nnz[sel])
            local_sel = np.arange(rec.size, dtype=np.int64) - np.repeat(np.concatenate(([0], np.cumsum(nnz[sel])[:-1])), nnz[sel])
            dest = starts[rec] + local_sel
            if not want4:
                codes[dest] = raw_codes.view(np.int8)
                continue
            nib = np.empty(raw_codes.size * 2, dtype=np.uint8)
            nib[0::2] = raw_codes & 0xF
            nib[1::2] = raw_codes >> 4
            nbytes = (nnz[sel] + 1) // 2
            byte_start = np.concatenate(([0], np.cumsum(nbytes)[:-1]))
            odd = nnz[sel] % 2 == 1
            pads = nib[2 * byte_start[odd] + nnz[sel][odd]]
            bad_pad = np.zeros(len(heads), dtype=bool)
            bad_pad[sel[odd]] = pads != 0
            self._fail(bad_pad, "tensor {name!r}: int4 values: the padding nibble is not 0")
            signed = nib[2 * np.repeat(byte_start, nnz[sel]) + local_sel].astype(np.int8)
            codes[dest] = np.where(signed > 7, signed - 16, signed)
        blocks = np.array([h.block for h in heads], dtype=np.int64)
        scale_counts = np.array([s.size for s in self.scales], dtype=np.int64)
        scale_start = np.concatenate(([0], np.cumsum(scale_counts)[:-1]))
        local = np.arange(total, dtype=np.int64) - starts[rec_of]
        values = codes.astype(np.float32) * scales[scale_start[rec_of] + local // blocks[rec_of]]
        if values.size and not np.isfinite(values.sum(dtype=np.float64)):
            sums = [values[int(a) : int(a) + int(n)].sum(dtype=np.float64) for a, n in zip(starts, nnz, strict=True)]
            bad = ~np.isfinite(np.array(sums))
            self._fail(bad, "tensor {name!r}: values are not all finite", NonFiniteError)
        out = {}
        for k, h in enumerate(heads):
            lo, hi = int(starts[k]), int(starts[k] + h.nnz)
            out[h.name] = SparseTensor(shape=h.shape, values=values[lo:hi], indices=indices[lo:hi])
        return out


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
