"""Devices' retained statuses: which are online, counted as the statuses arrive (never by a
scan of the fleet per update), and each one recorded in the store."""

from __future__ import annotations

import logging

from compression import CodecError
from compression.protocol import DeviceStatus
from coordinator.store import Store

log = logging.getLogger(__name__)

READY_STATES = ("waiting", "idle")


class Presence:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.online: dict[str, bool] = {}
        self.count = 0
        """Devices whose last status was not ``offline``."""
        self.ready: set[str] = set()
        """Devices whose last status says they wait for work (``waiting`` or ``idle``): whom a cohort may invite."""

    def observe(self, device: str, payload: bytes) -> None:
        """A status from ``device``'s topic; a bad one is logged and ignored, an empty one is a cleared retained status."""
        if not payload:
            return
        try:
            status = DeviceStatus.from_json(payload)
        except CodecError as exc:
            log.warning("bad status from %s: %s", device, exc)
            return
        online = status.state != "offline"
        self.count += int(online) - int(self.online.get(device, False))
        self.online[device] = online
        if status.state in READY_STATES:
            self.ready.add(device)
        else:
            self.ready.discard(device)
        self.store.record_status(device, status.state, status.version, status.profile, status.metrics, status.tier)
