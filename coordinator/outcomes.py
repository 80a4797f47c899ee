"""What the coordinator says about each update, and counts: rejections (stored, counted, exported as
metrics), end-to-end acks (stored in the batch's transaction, published after its commit), and
duplicates (a resend of an update already processed is confirmed again, never applied twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from compression import CodecError, protocol
from compression.partial import PartialAck
from compression.protocol import UpdateAck, UpdateHeader
from coordinator.errors import Rejection
from coordinator.metrics import Metrics
from coordinator.store import Store

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, store: Store, metrics: Metrics, ackable: Callable[[str], bool]) -> None:
        self.store = store
        self.metrics = metrics
        self.ackable = ackable
        # Counted once here and kept current in memory: COUNT(*) over the ledger on every
        # update would grow with the fleet's history.
        self.counts = store.counts()
        self.rejections = store.rejection_counts()
        self.duplicates = 0
        self.acks_out: list[UpdateAck | PartialAck] = []
        """Acks to publish after the commit: devices' and (at a root) sites' partials'."""

    def reject(self, device: str | None, rej: Rejection, n: int = 1, *, record: bool = True) -> None:
        """Count ``n`` refusals of ``rej``'s reason (and store one row, unless the rows already exist)."""
        if record:
            log.warning("rejected update from %s: %s", device, rej)
            self.store.record_rejection(device, rej.reason, rej.detail)
        self.counts["rejected"] += n
        self.rejections[rej.reason] = self.rejections.get(rej.reason, 0) + n
        self.metrics.reject(rej.reason, n)

    def ack(self, header: UpdateHeader, outcome: str, reason: str | None, version: int) -> None:
        if not self.ackable(header.device):
            return
        self.store.record_ack(header.device, header.update_id, header.seq, outcome, reason, version)
        self.acks_out.append(UpdateAck(header.device, header.seq, header.update_id, outcome, reason, version, time.time()))

    def duplicate(self, header: UpdateHeader, version: int, waiting: Callable[[str], bool]) -> bool:
        """A resend of an update already processed: count it, confirm it again, and drop it."""
        if self.store.is_applied(header.update_id):
            outcome, reason = ("buffered" if waiting(header.update_id) else "applied"), None
        else:
            last = self.store.last_ack(header.device)
            if last is None or last["update_id"] != header.update_id:
                return False
            outcome, reason = str(last["outcome"]), last["reason"]
        self.duplicates += 1
        self.metrics.duplicates.inc()
        log.info("duplicate of %s from %s: confirmed again as %s", header.update_id, header.device, outcome)
        self.ack(header, outcome, reason, version)
        return True

    def take_acks(self) -> list[UpdateAck | PartialAck]:
        acks, self.acks_out = self.acks_out, []
        return acks

    def mark(self) -> tuple[Any, ...]:
        return dict(self.counts), dict(self.rejections), self.duplicates, len(self.acks_out)

    def restore(self, mark: tuple[Any, ...]) -> None:
        self.counts, self.rejections, self.duplicates, n_acks = mark
        del self.acks_out[n_acks:]

    def handler_error(self, topic: str, payload: bytes, error: str, version: int, max_update_bytes: int) -> None:
        """A message whose handling failed: an update is refused as ``handler_error`` and its device told."""
        try:
            _fleet, device, leaf = protocol.parse_device_topic(topic)
        except CodecError:
            return
        if leaf != "update":
            return
        self.reject(device, Rejection("handler_error", error))
        try:
            header = protocol.decode_signed_envelope(payload, max_update_bytes).header
        except CodecError:
            return
        if header.device == device:
            self.ack(header, "rejected", f"handler_error: {error}", version)

    def status(self, state: str, version: int, online_fields: dict[str, object]) -> dict[str, object]:
        """The coordinator's retained status: counts and ``online_fields`` while online."""
        payload: dict[str, object] = {"state": state, "version": version, "ts": time.time()}
        if state == "online":
            payload.update(self.counts, rejections=dict(self.rejections), duplicates=self.duplicates, **online_fields)
        return payload
