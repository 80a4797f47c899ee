"""End-to-end delivery of updates: stop-and-wait over the on-disk outbox.

A broker's PUBACK says only that the broker took a message; Mosquitto keeps it in memory
until its next autosave, and a hijacked or expired session loses it. So an update leaves
the outbox only when the coordinator's signed ack names it (``applied``, ``buffered`` or
``rejected``). One update is in flight at a time, oldest first: it is resent after
``ack_timeout_s`` or a reconnect, and the coordinator confirms a resend of an update it
already processed again instead of applying it twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from compression import CodecError, protocol
from compression.protocol import UpdateAck
from edge_agent.errors import PublishRefused, TransportError
from edge_agent.state import AgentState
from edge_agent.transport import AgentTransport

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    path: Path
    update_id: str
    sent: float
    reconnects: int


class Outbox:
    """Sends the oldest pending update and deletes it when the coordinator confirms it."""

    def __init__(self, state: AgentState, transport: AgentTransport, topic: str, ack_timeout_s: float) -> None:
        self.state = state
        self.transport = transport
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self._in_flight: _InFlight | None = None
        self.sent = 0
        self.resent = 0
        self.bytes_sent = 0
        self.confirmed = 0
        self.refused = 0

    def pending_count(self) -> int:
        return len(self.state.pending())

    def flush(self) -> None:
        """Publish the oldest pending update unless it is in flight and not yet overdue."""
        pending = self.state.pending()
        if not pending or not self.transport.connected.is_set():
            return
        head = pending[0]
        f = self._in_flight
        if f is not None and f.path == head and f.reconnects == self.transport.reconnects:
            if time.monotonic() - f.sent < self.ack_timeout_s:
                return
        try:
            payload = head.read_bytes()
            update_id = protocol.decode_signed_envelope(payload).header.update_id
        except (OSError, CodecError) as exc:
            log.error("outbox entry %s is unreadable, moved to outbox/rejected: %s", head.name, exc)
            self.state.dead_letter(head, f"unreadable outbox entry: {exc}")
            return
        try:
            self.transport.publish(self.topic, payload, timeout=30.0)
        except PublishRefused as exc:
            log.error("update %s refused by the broker for good, moved to outbox/rejected: %s", head.name, exc)
            self.state.dead_letter(head, str(exc))
            self._in_flight = None
            return
        except TransportError as exc:
            log.warning("update %s stays in the outbox: %s", head.name, exc)
            return
        if f is not None and f.path == head:
            self.resent += 1
            log.info("resent update %s: no confirmation from the coordinator yet", update_id)
        else:
            self.sent += 1
            self.bytes_sent += len(payload)
        self._in_flight = _InFlight(head, update_id, time.monotonic(), self.transport.reconnects)

    def on_ack(self, ack: UpdateAck) -> bool:
        """Settle the pending update the ack names; True if one was settled."""
        for path in self.state.pending():
            if self._in_flight is not None and self._in_flight.path == path:
                uid = self._in_flight.update_id
            else:
                try:
                    uid = protocol.decode_signed_envelope(path.read_bytes()).header.update_id
                except (OSError, CodecError):
                    continue  # flush() moves it away
            if uid != ack.update_id:
                continue
            if ack.outcome == "rejected":
                self.refused += 1
                log.error("the coordinator refused update %s (seq %d): %s", ack.update_id, ack.seq, ack.reason)
                self.state.dead_letter(path, f"refused by the coordinator: {ack.reason}")
            else:
                self.confirmed += 1
                log.info("the coordinator confirmed update %s as %s at v%d", ack.update_id, ack.outcome, ack.version)
                self.state.delivered(path)
            if self._in_flight is not None and self._in_flight.path == path:
                self._in_flight = None
            return True
        return False
