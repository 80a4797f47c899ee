"""From an update's bytes to an accepted update, or a counted refusal: the envelope, its signature and
sequence number, the frame against the global state's shapes, staleness, the norm bound, the
rate limit, and the sample count's caps. The order matters: rate limits count valid updates
only, so junk is refused by its real reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from compression import CodecError, FrameKind, FrameLimits, compress_dense, protocol
from compression.frame import SparseTensor
from compression.protocol import Envelope
from coordinator.config import CoordinatorConfig
from coordinator.decoder import Decoder
from coordinator.engine import Accepted
from coordinator.errors import Rejection
from coordinator.identity import Verifier
from coordinator.influence import InfluenceTracker
from coordinator.ratelimit import RateLimiter
from coordinator.store import BufferedUpdate, LedgerEntry, Store
from coordinator.validate import ValidUpdate, validate_envelope

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)


class Intake:
    """Validation with everything it needs to remember: identities, rate limits, recent norms and samples."""

    def __init__(self, cfg: CoordinatorConfig, store: Store, influence: InfluenceTracker) -> None:
        limits = cfg.limits
        if limits.lab_mode:
            log.warning(
                "LAB MODE: this coordinator accepts %s; never run a production fleet like this",
                "updates from devices that were never enrolled" if limits.allow_unknown_devices else "unsigned updates",
            )
        self.cfg = cfg
        self.store = store
        self.influence = influence
        self.rate = RateLimiter(limits.max_updates_per_minute, limits.rate_burst)
        self.verifier = Verifier(
            store, allow_unknown=limits.allow_unknown_devices or bool(limits.devices), require_signatures=limits.require_signatures
        )
        self._limits: tuple[dict[str, tuple[int, ...]], FrameLimits] | None = None
        self.decoder = Decoder(enabled=cfg.decoder_process)
        self._envelopes: dict[int, tuple[bytes, Envelope]] = {}

    def is_known(self, device: str) -> bool:
        return self.cfg.limits.allow_unknown_devices or device in self.cfg.limits.devices

    def ackable(self, device: str) -> bool:
        """Acks go to enrolled or admitted devices only: no retained message for every id a stranger invents."""
        return self.is_known(device) or self.store.identity(device) is not None

    def envelope(self, payload: bytes) -> Envelope:
        early = self._envelopes.pop(id(payload), None)
        if early is not None and early[0] is payload:
            return early[1]
        try:
            return protocol.decode_signed_envelope(payload, max_bytes=self.cfg.limits.max_update_bytes)
        except CodecError as exc:
            raise Rejection(exc.reason, str(exc)) from None

    def prefetch(self, payloads: list[bytes], shapes: dict[str, tuple[int, ...]]) -> None:
        """Read a batch's update envelopes now and hand their frames to the decoder process, which
        decodes them while the worker handles the batch in order (:class:`~coordinator.decoder.Decoder`)."""
        self.done()
        if not self.decoder.enabled:
            return
        frames = []
        for payload in payloads:
            try:
                env = self.envelope(payload)
            except Rejection:
                continue  # refused when its turn comes
            self._envelopes[id(payload)] = (payload, env)
            if self.ackable(env.header.device):  # a stranger's frame is refused before it is decoded
                frames.append(env.frame)
        self.decoder.submit(frames, self._frame_limits(shapes))

    def done(self) -> None:
        """The batch is over: forget what was read ahead of it."""
        self._envelopes.clear()
        self.decoder.forget()

    def _frame_limits(self, shapes: dict[str, tuple[int, ...]]) -> FrameLimits:
        """The decoder's limits for ``shapes``, computed once for each global state's shapes."""
        if self._limits is None or self._limits[0] is not shapes:
            self._limits = (shapes, FrameLimits.for_shapes(shapes, self.cfg.limits.max_update_bytes))
        return self._limits[1]

    def validate(
        self, device: str, env: Envelope, size: int, shapes: dict[str, tuple[int, ...]], version: int, base_sha256: str = ""
    ) -> ValidUpdate:
        """The update, its sample count capped; raises :class:`Rejection`."""
        limits = self.cfg.limits
        valid = validate_envelope(
            device,
            env,
            size,
            shapes=shapes,
            current_version=version,
            strategy=self.cfg.strategy,
            max_update_bytes=limits.max_update_bytes,
            max_update_norm=self.influence.bound(),
            is_known_device=self.is_known,
            is_duplicate=self.store.is_applied,
            check_identity=self.verifier.check,
            limits=self._frame_limits(shapes),
            base_sha256=base_sha256,
            decode=self.decoder.decode,
        )
        if not self.rate.allow(device):
            raise Rejection("rate_limited", f"more than {limits.max_updates_per_minute:g} updates a minute")
        return self._capped(valid)

    def _capped(self, valid: ValidUpdate) -> ValidUpdate:
        """The update with its sample count capped (enrolment, absolute, and relative to the fleet)."""
        h = valid.header
        ident = self.store.identity(h.device)
        n = self.influence.capped_samples(h.device, h.num_samples, None if ident is None else ident.get("max_samples"))
        if n == h.num_samples:
            return valid
        log.info("%s claimed %d samples; weighted as %d", h.device, h.num_samples, n)
        return replace(valid, header=replace(h, num_samples=n))


def ledger_entry(valid: ValidUpdate) -> LedgerEntry:
    """The update's ledger row; its weight is set when a version takes it."""
    h = valid.header
    return LedgerEntry(
        update_id=h.update_id,
        device=h.device,
        seq=h.seq,
        base_version=h.base_version,
        staleness=valid.staleness,
        weight=0.0,
        num_samples=h.num_samples,
        size=valid.size,
        train_loss=h.train_loss,
        norm=valid.norm,
    )


def accepted(b: BufferedUpdate, tensors: dict[str, SparseTensor] | Any) -> Accepted:
    """The engine's view of a stored (or just validated) update."""
    e = b.entry
    return Accepted(e.update_id, e.device, e.base_version, e.num_samples, tensors, ref=b)


def offer_derived(svc: CoordinatorService, entry: LedgerEntry, mean: dict[str, np.ndarray], frame: bytes | None = None) -> None:
    """An update the coordinator derived itself (a secure cohort's unmasked mean, a site's group)
    into the engine, in the caller's transaction: as its tensors, and kept in the buffer as a
    lossless frame (``frame``, or one made now) if it waits there."""
    update = Accepted(entry.update_id, entry.device, entry.base_version, entry.num_samples, mean, ref=BufferedUpdate(entry, b""))
    step = svc.engine.offer(update, time.monotonic(), svc._online_count())
    if step is None:
        svc.store.add_to_buffer(entry, frame if frame is not None else compress_dense(mean, FrameKind.UPDATE))
    elif not svc._commit(step):
        log.error("%s: the step it completed was not finite and was dropped", entry.update_id)
