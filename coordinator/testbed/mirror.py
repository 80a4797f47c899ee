"""Follow the fleet's global versions from the retained MQTT messages, as a device would.

Used by simulated devices (one mirror per fleet process) and by benchmarks that score
every version the coordinator publishes. A delta that chains onto the held version is
applied; otherwise the snapshot is taken. Either way the result must match the
coordinator's state digest, or it is not adopted.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np

from compression import CodecError, FrameKind, apply_delta, decode_frame, protocol, state_digest
from compression.protocol import GlobalMeta

log = logging.getLogger(__name__)

KEEP_FRAMES = 8
"""Deltas and snapshots kept while their meta is on its way (older ones are dropped)."""


class GlobalMirror:
    """Feed it every message of the three global topics; it holds the newest verified version."""

    def __init__(self, fleet: str, on_version: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> None:
        self.fleet = fleet
        self.topics = (protocol.global_meta(fleet), protocol.global_snapshot(fleet), protocol.global_delta(fleet))
        self.version: int | None = None
        self.state: dict[str, np.ndarray] = {}
        self.spec: dict[str, object] = {}
        self.on_version = on_version
        self._frames: dict[str, bytes] = {}
        self._pending: GlobalMeta | None = None
        self.bytes_down = 0
        self.errors = 0
        self.adopted_at: dict[int, float] = {}
        """Wall-clock time each version was adopted here."""

    def handle(self, topic: str, payload: bytes) -> None:
        self.bytes_down += len(payload)
        meta_t, snap_t, delta_t = self.topics
        if topic in (snap_t, delta_t):
            self._frames[hashlib.sha256(payload).hexdigest()] = payload
            while len(self._frames) > KEEP_FRAMES:
                self._frames.pop(next(iter(self._frames)))
        elif topic == meta_t:
            try:
                self._pending = GlobalMeta.from_json(payload)
            except CodecError as exc:
                self.errors += 1
                log.warning("bad global meta ignored: %s", exc)
                return
        self._advance()

    def _advance(self) -> None:
        meta = self._pending
        if meta is None or (self.version is not None and meta.version <= self.version):
            return
        tensors = None
        if meta.delta_base_version is not None and meta.delta_base_version == self.version and meta.delta_sha256 in self._frames:
            tensors = self._decode(self._frames[meta.delta_sha256], FrameKind.GLOBAL_DELTA, meta)
        if tensors is None and meta.snapshot_sha256 in self._frames:
            tensors = self._decode(self._frames[meta.snapshot_sha256], FrameKind.SNAPSHOT, meta)
        if tensors is None:
            return  # its frames are still on the way
        self.version, self.state, self.spec = meta.version, tensors, dict(meta.model)
        self._pending = None
        self.adopted_at[meta.version] = time.time()
        if self.on_version is not None:
            self.on_version(meta.version, tensors)

    def _decode(self, payload: bytes, kind: FrameKind, meta: GlobalMeta) -> dict[str, np.ndarray] | None:
        try:
            frame = decode_frame(payload)
            if frame.kind != kind:
                raise CodecError(f"expected a {kind.name} frame, got {frame.kind.name}")
            tensors = apply_delta(self.state, frame.dense()) if kind == FrameKind.GLOBAL_DELTA else frame.dense()
        except CodecError as exc:
            self.errors += 1
            log.warning("global %s for v%d unusable: %s", kind.name.lower(), meta.version, exc)
            return None
        if state_digest(tensors) != meta.state_sha256:
            if kind == FrameKind.SNAPSHOT:
                self.errors += 1
                log.warning("snapshot of v%d does not match its state digest", meta.version)
            return None
        return tensors
