"""Following the fleet's global versions: the one rule, for the agent and for simulated devices.

Feed a :class:`Follower` what arrives on the three retained global topics (already parsed
and, on a device, verified metas; raw delta and snapshot frames). :meth:`Follower.follow`
then decides, for the newest meta it knows:

- apply the chain of global deltas from the version held, each checked against its meta's
  state digest (a delta may span several versions: the coordinator publishes the versions
  one batch of updates made as one delta from the last version it published);
- or, when the chain is broken (a delta missing or unusable, or nothing held yet), take
  the snapshot the newest meta names, checked against its digest;
- or wait, when neither has arrived yet; :attr:`FollowResult.behind` then says the
  snapshot is needed (a device subscribes to the snapshot topic only while it is behind).

It is pure: no I/O, no clock. Everything it keeps is bounded: ``keep`` metas and deltas,
and one snapshot. Decoding is bounded by the shapes already held (or by ``max_bytes``
before the first version).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compression.codec import apply_delta, state_digest
from compression.errors import CodecError
from compression.frame import FrameKind, FrameLimits, decode_frame
from compression.protocol import GlobalMeta

KEEP = 64
"""Metas and deltas kept while the rest of a version is on its way."""

Vet = Callable[[GlobalMeta, dict[str, np.ndarray]], None]
"""Called before a snapshot is taken; raises to refuse the version (the follower does not catch it)."""


@dataclass(frozen=True)
class FollowResult:
    moved: bool
    """Whether the held version changed."""
    version: int | None
    """The version held now."""
    via_snapshot: bool = False
    deltas_applied: int = 0
    behind: bool = False
    """A newer version is known but could not be reached: the snapshot is needed."""
    problems: tuple[str, ...] = ()
    """Why a delta or snapshot was passed over (for the log)."""


class Follower:
    """Holds the newest global version it could verify."""

    def __init__(self, *, keep: int = KEEP, max_bytes: int = 256 << 20) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.version: int | None = None
        self.tensors: dict[str, np.ndarray] = {}
        self.meta: GlobalMeta | None = None
        """The meta of the version held."""
        self.metas: dict[int, GlobalMeta] = {}
        self._deltas: dict[str, bytes] = {}
        self._snapshot: bytes | None = None

    # -- what arrives ------------------------------------------------------------------

    def add_meta(self, meta: GlobalMeta) -> None:
        if self.version is not None and meta.version <= self.version:
            return
        self.metas[meta.version] = meta
        for old in sorted(self.metas)[: -self.keep]:
            del self.metas[old]

    def add_delta(self, frame: bytes) -> None:
        self._deltas[hashlib.sha256(frame).hexdigest()] = frame
        while len(self._deltas) > self.keep:
            del self._deltas[next(iter(self._deltas))]

    def add_snapshot(self, frame: bytes) -> None:
        self._snapshot = frame

    def mark(self) -> tuple[Any, ...]:
        """Everything the ``add_*`` methods and :meth:`follow` change, to undo them with :meth:`restore`
        (a holder whose durable record of a version was rolled back must hold the old one again)."""
        return self.version, self.tensors, self.meta, dict(self.metas), dict(self._deltas), self._snapshot

    def restore(self, mark: tuple[Any, ...]) -> None:
        self.version, self.tensors, self.meta, metas, deltas, self._snapshot = mark
        self.metas, self._deltas = dict(metas), dict(deltas)

    def forget(self, version: int) -> None:
        """Drop a version's meta and the snapshot (a version the device refused)."""
        self.metas.pop(version, None)
        self._snapshot = None

    @property
    def latest(self) -> GlobalMeta | None:
        """The newest meta known."""
        return self.metas[max(self.metas)] if self.metas else None

    # -- the rule --------------------------------------------------------------------

    def limits(self) -> FrameLimits:
        """Decoder limits for global frames: the shapes held bound them, else ``max_bytes``."""
        if self.tensors:
            return FrameLimits.for_shapes({k: v.shape for k, v in self.tensors.items()}, self.max_bytes)
        return FrameLimits(max_frame_bytes=self.max_bytes, max_body_bytes=2 * self.max_bytes, max_total_numel=self.max_bytes // 2)

    def follow(self, vet: Vet | None = None) -> FollowResult:
        """Move as far towards the newest known meta as what arrived allows."""
        latest = self.latest
        if latest is None or (self.version is not None and latest.version <= self.version):
            return FollowResult(False, self.version)
        problems: list[str] = []
        applied = self._follow_deltas(problems)
        via_snapshot = False
        if self.version is None or self.version < latest.version:
            via_snapshot = self._take_snapshot(latest, vet, problems)
        behind = self.version is None or self.version < latest.version
        if not behind:
            self._snapshot = None
        for v in [v for v in self.metas if self.version is not None and v <= self.version]:
            del self.metas[v]
        return FollowResult(applied > 0 or via_snapshot, self.version, via_snapshot, applied, behind, tuple(problems))

    def _follow_deltas(self, problems: list[str]) -> int:
        applied = 0
        while self.version is not None:
            held = self.version
            meta = next((m for v, m in sorted(self.metas.items()) if v > held and m.delta_base_version == held and m.delta_sha256), None)
            if meta is None or meta.delta_sha256 is None:
                return applied
            frame_bytes = self._deltas.get(meta.delta_sha256)
            if frame_bytes is None:
                return applied
            try:
                frame = decode_frame(frame_bytes, self.limits())
                if frame.kind is not FrameKind.GLOBAL_DELTA:
                    raise CodecError(f"expected a global delta frame, got {frame.kind.name}")
                tensors = apply_delta(self.tensors, frame.dense())
            except CodecError as exc:
                del self._deltas[meta.delta_sha256]
                problems.append(f"global delta to v{meta.version} unusable ({exc})")
                return applied
            if state_digest(tensors) != meta.state_sha256:
                del self._deltas[meta.delta_sha256]
                problems.append(f"the state after the delta to v{meta.version} does not match its digest")
                return applied
            del self._deltas[meta.delta_sha256]
            self.version, self.tensors, self.meta = meta.version, tensors, meta
            applied += 1
        return applied

    def _take_snapshot(self, meta: GlobalMeta, vet: Vet | None, problems: list[str]) -> bool:
        snap = self._snapshot
        if snap is None or hashlib.sha256(snap).hexdigest() != meta.snapshot_sha256:
            return False  # the matching snapshot (or meta) is still on its way
        try:
            frame = decode_frame(snap, self.limits())
            if frame.kind is not FrameKind.SNAPSHOT:
                raise CodecError(f"expected a snapshot frame, got {frame.kind.name}")
        except CodecError as exc:
            self._snapshot = None
            problems.append(f"snapshot of v{meta.version} unusable ({exc})")
            return False
        tensors = frame.dense()
        if state_digest(tensors) != meta.state_sha256:
            self._snapshot = None
            problems.append(f"the snapshot of v{meta.version} does not match its state digest")
            return False
        if vet is not None:
            vet(meta, tensors)
        self.version, self.tensors, self.meta = meta.version, tensors, meta
        return True
