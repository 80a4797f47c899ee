"""Coding of the sorted flat indices of a sparse tensor.

Indices are strictly increasing, so they are sent as gaps: the first index, then the
differences (each ≥ 1). Three codings of the gaps exist; ``benchmarks.codec`` measures
them on real LoRA and embedding-row deltas, after zstd:

- ``u32``: four bytes a gap, left for zstd to shrink (format version 1);
- ``bitpack``: every gap in the same number of bits ``w`` (one byte says ``w``), packed
  little-endian; the smallest before zstd;
- ``varint``: LEB128, 7 bits a byte.

Every decoder checks the byte count, the gap values and the final bound, and raises
:class:`~compression.errors.FrameError` on any inconsistency.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from compression.errors import CodecError, FrameError


class IndexCoding(IntEnum):
    """Wire code of an index coding; it is the tensor record's ``layout`` byte."""

    U32 = 1
    BITPACK = 2
    VARINT = 3

    @classmethod
    def from_name(cls, name: str) -> IndexCoding:
        try:
            return {"u32": cls.U32, "bitpack": cls.BITPACK, "varint": cls.VARINT}[name]
        except KeyError:
            raise CodecError(f"unknown index coding {name!r}; expected u32, bitpack or varint") from None


def to_gaps(indices: np.ndarray) -> np.ndarray:
    """Sorted unique indices to gaps (first index, then differences)."""
    return np.diff(np.asarray(indices, dtype=np.int64), prepend=0).astype(np.uint32)


def from_gaps(gaps: np.ndarray, numel: int, what: str) -> np.ndarray:
    """Gaps back to indices, checking that they are strictly increasing and below ``numel``."""
    gaps = gaps.astype(np.int64)
    if gaps.size and np.any(gaps[1:] == 0):
        raise FrameError(f"{what}: indices are not strictly increasing")
    indices = np.cumsum(gaps)
    if indices.size and indices[-1] >= numel:
        raise FrameError(f"{what}: index {int(indices[-1])} out of range for {numel} elements")
    return indices


# --- bit packing --------------------------------------------------------------------------


def bitpack_encode(gaps: np.ndarray) -> bytes:
    """``u8 width`` then ``ceil(n * width / 8)`` bytes of little-endian bit-packed gaps."""
    gaps = np.asarray(gaps, dtype=np.uint32)
    width = int(gaps.max()).bit_length() if gaps.size else 0
    if width == 0:
        return bytes([0])
    bits = ((gaps[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return bytes([width]) + np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def bitpack_size(n: int, width: int) -> int:
    return 1 + (n * width + 7) // 8


def bitpack_decode(buf: bytes, n: int, what: str) -> np.ndarray:
    """Inverse of :func:`bitpack_encode`; ``buf`` must be exactly the packed bytes."""
    width = buf[0]
    if width > 32:
        raise FrameError(f"{what}: bit width {width} exceeds 32")
    if len(buf) != bitpack_size(n, width):
        raise FrameError(f"{what}: {len(buf)} index bytes for {n} gaps of {width} bits")
    if width == 0:
        return np.zeros(n, dtype=np.uint32)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, offset=1), count=n * width, bitorder="little")
    weights = np.left_shift(np.uint64(1), np.arange(width, dtype=np.uint64))
    return (bits.reshape(n, width).astype(np.uint64) @ weights).astype(np.uint32)


# --- varint (LEB128) --------------------------------------------------------------------


def varint_encode(gaps: np.ndarray) -> bytes:
    """LEB128: 7 bits a byte, high bit set on every byte but a value's last."""
    return varint_bytes(np.asarray(gaps, dtype=np.uint64))[0]


def varint_bytes(v: np.ndarray) -> tuple[bytes, np.ndarray]:
    """LEB128 of the uint64 values ``v`` laid end to end, and the byte length of each."""
    if not v.size:
        return b"", np.zeros(0, dtype=np.int64)
    nbytes = np.ones(v.size, dtype=np.int64)
    for j in range(1, 10):
        longer = v >= np.uint64(1 << (7 * j))
        if not longer.any():
            break
        nbytes += longer
    total = int(nbytes.sum())
    owner = np.repeat(np.arange(v.size), nbytes)
    start = np.cumsum(nbytes) - nbytes
    pos = np.arange(total) - start[owner]
    out = ((v[owner] >> (7 * pos).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    last = pos == (nbytes[owner] - 1)
    out[~last] |= 0x80
    return out.tobytes(), nbytes


def varint_decode(buf: bytes, n: int, what: str) -> np.ndarray:
    """Decode exactly ``n`` LEB128 values that fill ``buf`` exactly."""
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != n or (n and ends[-1] != b.size - 1) or (not n and b.size):
        raise FrameError(f"{what}: varint indices do not hold exactly {n} values in {b.size} bytes")
    return varint_values(b, ends, what)


def varint_values(b: np.ndarray, ends: np.ndarray, what: str) -> np.ndarray:
    """The LEB128 values of the bytes ``b``, whose values end at the bytes ``ends`` (those below
    0x80; the caller has checked that the last byte is one)."""
    n = ends.size
    if not n:
        return np.zeros(0, dtype=np.uint32)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if np.any(lengths > 5):
        raise FrameError(f"{what}: a varint index is longer than 5 bytes")
    if lengths.max() == 1:
        return b.astype(np.uint32)  # every gap below 128: the common case of dense top-k
    # One pass per byte position (at most 5): the j-th byte of every value at least j+1 long.
    low = (b & 0x7F).astype(np.uint64)
    values = low[starts]
    for j in range(1, int(lengths.max())):
        longer = np.flatnonzero(lengths > j)
        values[longer] |= low[starts[longer] + j] << np.uint64(7 * j)
    if values.max() >= 1 << 32:
        raise FrameError(f"{what}: a varint index exceeds 32 bits")
    return values.astype(np.uint32)
