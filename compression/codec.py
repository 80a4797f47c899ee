"""The update codec: error feedback, top-k, value quantization and a frame.

``compress_update`` is the one call the agent makes per update. It is pure: the
error-feedback residual goes in as an :class:`ErrorFeedback` value and the new
residual comes out, so the caller decides where (and how durably) it lives.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from compression.errors import CodecError
from compression.frame import FrameKind, FrameLimits, SparseTensor, decode_frame, encode_frame
from compression.indices import IndexCoding
from compression.quantize import ValueType
from compression.sparsify import rotating_global, rotating_period, topk_global, topk_per_tensor


@dataclass(frozen=True)
class CodecConfig:
    """How an update is compressed on the wire."""

    topk_fraction: float = 0.02
    """Fraction of entries sent per update (1.0 sends the dense delta)."""
    topk_scope: Literal["tensor", "global"] = "global"
    """``tensor``: each tensor keeps its own top fraction; ``global``: over all tensors together."""
    values: Literal["fp32", "fp16", "int8", "int4", "sign"] = "int4"
    """Value encoding: lossless fp32, fp16, blockwise int8 or int4, or 1-bit sign with one fp32 scale per block."""
    int8_block: int = 256
    """Values per scale (int8, int4 and sign)."""
    index_coding: Literal["u32", "bitpack", "varint"] = "varint"
    """How sparse indices are coded (as gaps) before zstd."""
    zstd_level: int = 3
    """zstd compression level (1..22)."""
    error_feedback: bool = True
    """Keep what was not sent (and the quantization error) and add it to the next update."""
    selection: Literal["magnitude", "rotating"] = "magnitude"
    """Which entries go: ``magnitude`` (top-k by ``|value|``, per ``topk_scope``) or ``rotating``
    (every ``1/topk_fraction``-th entry, shifted by the update's phase: no index cost, the same
    coordinates on every device of a phase, every coordinate once per period)."""
    rescale: bool = False
    """Rotating selection only: send the selected entries times the period, so that the update
    is unbiased (each coordinate's expected value is its delta) instead of delayed. Error
    feedback then keeps only the quantization error of the entries sent."""

    def __post_init__(self) -> None:
        if not 0.0 < self.topk_fraction <= 1.0:
            raise CodecError(f"codec.topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.topk_scope not in ("tensor", "global"):
            raise CodecError(f"codec.topk_scope must be 'tensor' or 'global', got {self.topk_scope!r}")
        if self.selection not in ("magnitude", "rotating"):
            raise CodecError(f"codec.selection must be 'magnitude' or 'rotating', got {self.selection!r}")
        ValueType.from_name(self.values)
        IndexCoding.from_name(self.index_coding)
        if not 1 <= self.int8_block <= 1 << 20:
            raise CodecError(f"codec.int8_block must be in 1..{1 << 20}, got {self.int8_block}")
        if not 1 <= self.zstd_level <= 22:
            raise CodecError(f"codec.zstd_level must be in 1..22, got {self.zstd_level}")


@dataclass(frozen=True)
class ErrorFeedback:
    """The error-feedback residual: what earlier updates computed but did not send."""

    residual: dict[str, np.ndarray] = field(default_factory=dict)

    def compensate(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``delta + residual`` for every tensor of ``delta``."""
        out: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            d = np.asarray(d, dtype=np.float32)
            r = self.residual.get(name)
            out[name] = d + r if r is not None and r.shape == d.shape else d.copy()
        return out


@dataclass(frozen=True)
class CompressedUpdate:
    """The result of :func:`compress_update`."""

    frame: bytes
    sent: dict[str, np.ndarray]
    """Exactly what the receiver decodes, dense, per tensor."""
    feedback: ErrorFeedback
    """The residual to pass to the next call."""
    dense_fp32_bytes: int
    """The size the delta would have as dense fp32, for reporting the ratio."""


def compress_update(
    delta: Mapping[str, np.ndarray],
    config: CodecConfig,
    feedback: ErrorFeedback | None = None,
    kind: FrameKind = FrameKind.UPDATE,
    phase: int = 0,
) -> CompressedUpdate:
    """Compress ``delta`` into one frame, applying and renewing error feedback.

    ``phase`` keys the rotating selection: the global version the update was trained
    from (uplink) or the version it makes (downlink).
    """
    if not delta:
        raise CodecError("an update must carry at least one tensor")
    feedback = feedback or ErrorFeedback()
    corrected = feedback.compensate(delta) if config.error_feedback else {n: np.asarray(d, np.float32) for n, d in delta.items()}
    for name, arr in corrected.items():
        if not np.all(np.isfinite(arr)):
            raise CodecError(f"delta of {name!r} has non-finite values")
    rescaled = config.rescale and config.selection == "rotating" and config.topk_fraction < 1.0
    period = rotating_period(config.topk_fraction) if rescaled else 1
    if config.selection == "rotating" and config.topk_fraction < 1.0:
        sparse = rotating_global(corrected, config.topk_fraction, phase)
        if rescaled:
            with np.errstate(over="ignore"):
                sparse = {n: replace(t, values=(t.values * np.float32(period)).astype(np.float32)) for n, t in sparse.items()}
            for name, t in sparse.items():
                if not np.all(np.isfinite(t.values)):
                    raise CodecError(f"delta of {name!r} times the rotation period {period} overflows float32")
    elif config.topk_scope == "global":
        sparse = topk_global(corrected, config.topk_fraction)
    else:
        sparse = topk_per_tensor(corrected, config.topk_fraction)
    frame = encode_frame(
        kind,
        sparse,
        values=ValueType.from_name(config.values),
        int8_block=config.int8_block,
        zstd_level=config.zstd_level,
        index_coding=IndexCoding.from_name(config.index_coding),
    )
    # Decode our own frame so that the residual accounts for quantization error too,
    # and so that `sent` is bit-identical to what the receiver will apply.
    sent = decode_frame(frame, FrameLimits(max_frame_bytes=len(frame), max_body_bytes=1 << 40)).dense()
    # Tensors this update does not carry keep their residual (mixed fleets send subsets).
    if not config.error_feedback:
        residual: dict[str, np.ndarray] = {}
    elif rescaled:
        # Unsent entries are covered in expectation by the rescaling: only the debt of
        # what was quantized (in delta units) carries over, and unsent entries keep theirs.
        residual = dict(feedback.residual)
        for n, t in sparse.items():
            r = (
                np.zeros(corrected[n].size, np.float32)
                if n not in residual or residual[n].shape != corrected[n].shape
                else residual[n].reshape(-1).copy()
            )
            idx = np.asarray(t.indices, dtype=np.int64)
            r[idx] = (t.values - sent[n].reshape(-1)[idx]) / np.float32(period)
            residual[n] = r.reshape(corrected[n].shape)
    else:
        residual = {**feedback.residual, **{n: corrected[n] - sent[n] for n in corrected}}
    dense_bytes = int(sum(np.asarray(d).size * 4 for d in delta.values()))
    return CompressedUpdate(frame=frame, sent=sent, feedback=ErrorFeedback(residual), dense_fp32_bytes=dense_bytes)


def compress_dense(tensors: Mapping[str, np.ndarray], kind: FrameKind, zstd_level: int = 3) -> bytes:
    """A lossless frame of fp32 tensors (used for snapshots).

    A tensor that is mostly zero (an embedding-delta table whose untouched rows are 0)
    goes as a sparse record of its non-zero bit patterns, so ``-0.0`` survives and the
    decoded state is bit-identical.
    """
    records = {}
    for n, a in tensors.items():
        flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
        if flat.size >= 64 and np.count_nonzero(flat.view(np.uint32)) < flat.size // 3:
            nonzero = np.flatnonzero(flat.view(np.uint32))
            records[n] = SparseTensor(shape=tuple(np.shape(a)), values=flat[nonzero], indices=nonzero)
        else:
            records[n] = SparseTensor(shape=tuple(np.shape(a)), values=flat)
    return encode_frame(kind, records, values=ValueType.FP32, zstd_level=zstd_level, index_coding=IndexCoding.VARINT)


def apply_delta(state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state + delta`` in float32 for the tensors ``delta`` carries.

    The coordinator and every device use this one function on the same decoded delta, so
    that their copies of each global version are bit-identical (checked by
    :func:`state_digest`) and no drift builds up over versions.
    """
    out = dict(state)
    for name, d in delta.items():
        if name not in state:
            raise CodecError(f"delta carries {name!r}, which the state does not have")
        if tuple(np.shape(d)) != tuple(np.shape(state[name])):
            raise CodecError(f"delta of {name!r} has shape {np.shape(d)}, state has {np.shape(state[name])}")
        out[name] = np.add(state[name], d, dtype=np.float32)
    return out


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes and float32 bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name], dtype="<f4")
        raw = name.encode()
        h.update(struct.pack("<HB", len(raw), arr.ndim) + raw + struct.pack(f"<{arr.ndim}Q", *arr.shape))
        h.update(arr.tobytes())
    return h.hexdigest()
