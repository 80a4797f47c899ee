"""Validation of one update against the current global state. Pure: no I/O, no clock.

Each failure raises :class:`~coordinator.errors.Rejection` with a stable reason code:
``malformed``, ``malformed_frame``, ``bad_checksum``, ``too_large``, ``non_finite``,
``device_mismatch``, ``unknown_device``, ``wrong_base``, ``duplicate``, ``future_version``, ``too_stale``,
``shape_mismatch``, ``norm_bound``; the identity check adds ``unsigned``, ``unknown_key``,
``bad_signature``, ``replayed`` and ``revoked``. The service adds ``rate_limited`` (it needs a clock).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from compression import CodecError, FrameKind, FrameLimits, decode_frame, protocol
from compression.basehash import short
from compression.frame import Frame, SparseTensor, Tensors
from compression.protocol import UpdateHeader
from coordinator.errors import Rejection
from coordinator.strategy import StrategyConfig


@dataclass(frozen=True)
class ValidUpdate:
    header: UpdateHeader
    tensors: Mapping[str, SparseTensor]
    """The decoded update, sparse as it came (no dense copy of a 1% update)."""
    staleness: int
    size: int
    frame: bytes
    norm: float = 0.0
    """L2 norm of the update (the zeros a sparse update leaves out add nothing)."""

    @property
    def delta(self) -> dict[str, np.ndarray]:
        """The update as dense float32 arrays."""
        return {name: t.to_dense() for name, t in self.tensors.items()}


def validate_update(
    topic_device: str,
    payload: bytes,
    *,
    max_update_bytes: int,
    **checks: Any,
) -> ValidUpdate:
    """Check an update payload completely; return the decoded update or raise :class:`Rejection`."""
    try:
        env = protocol.decode_signed_envelope(payload, max_bytes=max_update_bytes)
    except CodecError as exc:
        raise Rejection(exc.reason, str(exc)) from None
    return validate_envelope(topic_device, env, len(payload), max_update_bytes=max_update_bytes, **checks)


def validate_envelope(
    topic_device: str,
    env: protocol.Envelope,
    size: int,
    *,
    shapes: Mapping[str, tuple[int, ...]],
    current_version: int,
    strategy: StrategyConfig,
    max_update_bytes: int,
    max_update_norm: float,
    is_known_device: Callable[[str], bool],
    is_duplicate: Callable[[str], bool],
    check_identity: Callable[[protocol.Envelope], bool] | None = None,
    limits: FrameLimits | None = None,
    base_sha256: str = "",
    decode: Callable[[bytes, FrameLimits], Frame] = decode_frame,
) -> ValidUpdate:
    """Check a decoded envelope: identity, base, frame, version, shapes and norm.

    ``base_sha256`` is the fleet's base (its weights' content hash): an update that declares
    another one is refused as ``wrong_base``; one that declares none is taken (devices from
    before the hash).

    ``limits`` are the decoder's limits for ``shapes`` and ``max_update_bytes`` when the caller
    keeps them (they cost more to compute than to decode a small frame). ``decode`` is
    :func:`~compression.frame.decode_frame`, or what gives its result from elsewhere
    (:class:`coordinator.decoder.Decoder`)."""
    header, frame_bytes = env.header, env.frame
    if header.device != topic_device:
        raise Rejection("device_mismatch", f"update says device {header.device!r} but came on {topic_device!r}'s topic")
    # A redelivery of an applied update is a duplicate (dropped quietly) before it is a replay.
    if is_duplicate(header.update_id):
        raise Rejection("duplicate", f"update {header.update_id!r} was already applied")
    signed = check_identity(env) if check_identity is not None else False
    if not signed and not is_known_device(header.device):
        raise Rejection("unknown_device", f"device {header.device!r} is not enrolled")
    if base_sha256 and header.base_sha256 and header.base_sha256 != base_sha256:
        raise Rejection(
            "wrong_base", f"trained on base sha256 {short(header.base_sha256)}, but the fleet trains base sha256 {short(base_sha256)}"
        )
    try:
        # Limits from the global state's shapes: no frame can make the decoder allocate more
        # than a dense copy of the state, whatever its headers claim.
        frame = decode(frame_bytes, limits or FrameLimits.for_shapes(shapes, max_update_bytes))
    except CodecError as exc:
        raise Rejection(exc.reason, str(exc)) from None
    if frame.kind is not FrameKind.UPDATE:
        raise Rejection("malformed_frame", f"expected an update frame, got {frame.kind.name}")
    if header.base_version > current_version:
        raise Rejection("future_version", f"base version {header.base_version} is newer than the current {current_version}")
    tau = current_version - header.base_version
    if tau > strategy.effective_max_staleness:
        limit = "strategy.round_late: rounds a straggler's update may be late" if strategy.kind == "fedavg" else "max_staleness"
        raise Rejection("too_stale", f"staleness {tau} exceeds {strategy.effective_max_staleness} ({limit})")
    if not frame.tensors:
        raise Rejection("malformed_frame", "update carries no tensors")
    tensors = frame.tensors
    for name, shape in tensors.shapes() if isinstance(tensors, Tensors) else ((n, t.shape) for n, t in tensors.items()):
        expected = shapes.get(name)
        if expected is None:
            raise Rejection("shape_mismatch", f"tensor {name!r} is not part of the global state")
        if tuple(shape) != tuple(expected):
            raise Rejection("shape_mismatch", f"tensor {name!r} has shape {tuple(shape)}, global has {tuple(expected)}")
    norm = float(np.sqrt(frame.sumsq))
    if not np.isfinite(norm):
        raise Rejection("non_finite", f"update norm overflows ({norm})")
    if max_update_norm > 0 and norm > max_update_norm:
        raise Rejection("norm_bound", f"update norm {norm:.4g} exceeds {max_update_norm:.4g}")
    return ValidUpdate(header=header, tensors=frame.tensors, staleness=tau, size=size, frame=frame_bytes, norm=norm)
