"""Value quantization of 1-D float arrays.

Three value types go on the wire:

- ``fp32``: lossless;
- ``fp16``: half precision, values outside ±65504 are rejected rather than turned
  into infinities;
- ``int8``: blockwise absmax quantization. Each block of ``block`` consecutive
  values has one fp32 scale ``max|v| / 127``; a value is sent as
  ``round(v / scale)``. The error of every value is at most ``scale / 2``;
- ``int4``: the same with 4-bit codes in -7..7 (``scale = max|v| / 7``), two codes a
  byte, low nibble first; the error of every value is at most ``scale / 2``;
- ``sign``: one bit a value and one fp32 scale per block, ``mean|v|`` of the block; a
  value is sent as ``±scale`` (signSGD-style; for comparison, it relies on error feedback).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from compression.errors import CodecError, FrameError

FP16_MAX = float(np.finfo(np.float16).max)


class ValueType(IntEnum):
    """Wire code of a value encoding."""

    FP32 = 0
    FP16 = 1
    INT8 = 2
    SIGN = 3
    INT4 = 4

    @classmethod
    def from_name(cls, name: str) -> ValueType:
        try:
            return {"fp32": cls.FP32, "fp16": cls.FP16, "int8": cls.INT8, "int4": cls.INT4, "sign": cls.SIGN}[name]
        except KeyError:
            raise CodecError(f"unknown value type {name!r}; expected fp32, fp16, int8, int4 or sign") from None

    @property
    def blockwise(self) -> bool:
        """Whether the type carries one fp32 scale per block of values."""
        return self in (ValueType.INT8, ValueType.INT4, ValueType.SIGN)


def quantize_int8(values: np.ndarray, block: int, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``values`` (1-D float) into codes in ``-qmax..qmax`` and one fp32 scale per block."""
    if block <= 0:
        raise CodecError(f"block size must be positive, got {block}")
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = v.size
    nblocks = -(-n // block)
    padded = np.zeros(nblocks * block, dtype=np.float32)
    padded[:n] = v
    blocks = padded.reshape(nblocks, block)
    scales = (np.abs(blocks).max(axis=1) / np.float32(qmax)).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / safe[:, None]), -qmax, qmax).astype(np.int8)
    return codes.reshape(-1)[:n], scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Inverse of :func:`quantize_int8`."""
    n = codes.size
    idx = np.arange(n) // block
    return codes.astype(np.float32) * scales[idx]


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Two's-complement nibbles of ``codes`` (in -8..7), two a byte, low nibble first; an odd tail pads with 0."""
    nib = (codes.astype(np.int16) & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``n`` codes as int8. Raises if the padding nibble is not 0."""
    nib = np.empty(packed.size * 2, dtype=np.uint8)
    nib[0::2] = packed & 0xF
    nib[1::2] = packed >> 4
    if nib.size > n and nib[n:].any():
        raise FrameError("int4 values: the padding nibble is not 0")
    signed = nib[:n].astype(np.int8)
    return np.where(signed > 7, signed - 16, signed).astype(np.int8)


def quantize_sign(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One bit per value (1 = non-negative) and one fp32 scale ``mean|v|`` per block."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = v.size
    nblocks = -(-n // block)
    padded = np.zeros(nblocks * block, dtype=np.float32)
    padded[:n] = np.abs(v)
    counts = np.full(nblocks, block, dtype=np.float32)
    if n % block:
        counts[-1] = n % block
    scales = (padded.reshape(nblocks, block).sum(axis=1) / counts).astype(np.float32)
    return np.packbits(v >= 0, bitorder="little"), scales


def dequantize_sign(bits: np.ndarray, scales: np.ndarray, block: int, n: int) -> np.ndarray:
    positive = np.unpackbits(bits, count=n, bitorder="little").astype(bool)
    mags = scales[np.arange(n) // block]
    return np.where(positive, mags, -mags).astype(np.float32)


def quantize_values(values: np.ndarray, vtype: ValueType, block: int) -> tuple[bytes, bytes]:
    """Encode 1-D float values; returns ``(scales_bytes, codes_bytes)``."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise CodecError("cannot encode non-finite values (NaN or infinity)")
    if vtype is ValueType.FP32:
        return b"", v.astype("<f4").tobytes()
    if vtype is ValueType.FP16:
        if v.size and float(np.abs(v).max()) > FP16_MAX:
            raise CodecError(f"value {float(np.abs(v).max()):.3g} exceeds the fp16 range")
        return b"", v.astype("<f2").tobytes()
    if vtype is ValueType.SIGN:
        bits, scales = quantize_sign(v, block)
        return scales.astype("<f4").tobytes(), bits.tobytes()
    if vtype is ValueType.INT4:
        codes, scales = quantize_int8(v, block, qmax=7)
        return scales.astype("<f4").tobytes(), pack_int4(codes).tobytes()
    codes, scales = quantize_int8(v, block)
    return scales.astype("<f4").tobytes(), codes.tobytes()


def code_bytes(vtype: ValueType, n: int) -> int:
    """Bytes of the value codes of ``n`` values."""
    sizes = {ValueType.FP32: 4 * n, ValueType.FP16: 2 * n, ValueType.INT8: n, ValueType.INT4: (n + 1) // 2, ValueType.SIGN: (n + 7) // 8}
    return sizes[vtype]


def dequantize_values(codes: bytes, n: int, scales: np.ndarray | None, vtype: ValueType, block: int) -> np.ndarray:
    """Decode the codes of ``n`` values that :func:`quantize_values` produced, as float32."""
    if vtype is ValueType.INT8:
        assert scales is not None
        return dequantize_int8(np.frombuffer(codes, dtype=np.int8, count=n), scales, block)
    if vtype is ValueType.INT4:
        assert scales is not None
        return dequantize_int8(unpack_int4(np.frombuffer(codes, dtype=np.uint8), n), scales, block)
    if vtype is ValueType.SIGN:
        assert scales is not None
        return dequantize_sign(np.frombuffer(codes, dtype=np.uint8), scales, block, n)
    dtype = "<f2" if vtype is ValueType.FP16 else "<f4"
    return np.frombuffer(codes, dtype=dtype, count=n).astype(np.float32)
