"""The coordinator's MQTT link: one paho client, callbacks that only enqueue, and what it publishes.

paho's network thread puts every message (and a ``"connected"`` marker) on :attr:`Link.inbox`;
the service's single worker takes them from there. Publishing is the retained global version
(delta, snapshot, then the meta that names both, signed with the fleet key), the retained
coordinator status, and the retained, signed per-device acks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from compression import FrameKind, compress_dense, protocol, state_digest
from compression.mqtt import ClientSetupError, connect_kwargs, make_client
from compression.partial import PartialAck
from compression.protocol import CohortInvite, GlobalMeta, TrainableSpec, UpdateAck
from coordinator.config import CoordinatorConfig
from coordinator.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received: float = 0.0


class Link:
    """Connects with a persistent session and manual acks, and publishes for the service."""

    def __init__(self, cfg: CoordinatorConfig, signer: Any) -> None:
        self.cfg = cfg
        self._signer = signer
        self.inbox: queue.Queue[Message | str] = queue.Queue()
        self.connected = threading.Event()
        b = cfg.broker
        try:
            self.client = make_client(b, b.client_id or f"coordinator-{cfg.fleet}", manual_ack=True, persistent=True, backoff=(1, 30))
        except ClientSetupError as exc:
            raise ConfigError(str(exc)) from None
        offline = json.dumps({"state": "offline"}).encode()
        self.client.will_set(protocol.coordinator_status(cfg.fleet), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def start(self) -> None:
        b = self.cfg.broker
        try:
            self.client.connect(b.host, b.port, keepalive=b.keepalive, **connect_kwargs(b, persistent=True))
        except OSError as exc:
            raise BrokerError(f"cannot connect to the broker at {b.host}:{b.port}: {exc}") from None
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection: %s", reason)
            return
        fleet = self.cfg.fleet
        topics = [(protocol.all_updates(fleet), 1), (protocol.all_device_status(fleet), 1)]
        if self.cfg.site.enabled:  # the root's versions and this site's acks come down the bridge
            site = self.cfg.site.id
            topics += [(t, 1) for t in (protocol.global_meta(fleet), protocol.global_delta(fleet), protocol.global_snapshot(fleet))]
            topics += [(protocol.site_ack(fleet, site), 1), (protocol.site_bridge(fleet, site), 1)]
        else:  # a root: its sites' partials, statuses and bridges
            topics += [(t, 1) for t in (protocol.all_partials(fleet), protocol.all_site_status(fleet), protocol.all_site_bridges(fleet))]
        if self.cfg.secagg.enabled:
            topics.append((protocol.all_secagg(fleet), 1))
        client.subscribe(topics)
        self.connected.set()
        self.inbox.put("connected")  # the worker republishes the global state

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self.connected.clear()
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put(Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.monotonic()))

    def ack(self, msg: Message) -> None:
        """Acknowledge a message to the broker (only after what it caused is committed)."""
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def next_batch(self, limit: int, timeout: float) -> list[Message | str]:
        """What arrived, in order: up to ``timeout`` s for the first item, then what is queued, at most ``limit``."""
        try:
            batch = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < limit:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def publish_version(
        self, spec: TrainableSpec, version: int, state: dict[str, np.ndarray], delta_base: int | None, delta_frame: bytes | None
    ) -> None:
        """Publish a version retained: delta (from ``delta_base``), snapshot, then meta (the meta names both)."""
        snapshot = compress_dense(state, FrameKind.SNAPSHOT, self.cfg.snapshot_zstd_level)
        fleet = self.cfg.fleet
        delta_fields: dict[str, object] = {}
        if delta_frame is not None and delta_base is not None and 0 <= delta_base < version:
            delta_fields = {
                "delta_base_version": delta_base,
                "delta_sha256": hashlib.sha256(delta_frame).hexdigest(),
                "delta_bytes": len(delta_frame),
            }
            self.client.publish(protocol.global_delta(fleet), delta_frame, qos=1, retain=True)
        meta = GlobalMeta(
            version=version,
            snapshot_sha256=hashlib.sha256(snapshot).hexdigest(),
            snapshot_bytes=len(snapshot),
            created=time.time(),
            state_sha256=state_digest(state),
            model=spec.to_dict(),
            cohorts=self.cfg.cohorts.enabled,
            **delta_fields,  # type: ignore[arg-type]
        )
        self.client.publish(protocol.global_snapshot(fleet), snapshot, qos=1, retain=True)
        self.client.publish(protocol.global_meta(fleet), meta.signed(self._signer).to_json(), qos=1, retain=True)

    def publish_invites(self, invites: list[CohortInvite]) -> None:
        """Each invitation to its device alone (QoS 1, not retained: an offline device becomes a dropout)."""
        for inv in invites:
            self.client.publish(protocol.cohort_invite(self.cfg.fleet, inv.cohort, inv.device), inv.signed(self._signer).to_json(), qos=1)

    def publish_secagg(self, topic: str, payload: bytes) -> None:
        """A secure-aggregation message to one cohort member (QoS 1, not retained; already signed)."""
        self.client.publish(topic, payload, qos=1)

    def publish_ack(self, ack: UpdateAck | PartialAck) -> None:
        if isinstance(ack, PartialAck):
            self.client.publish(protocol.site_ack(self.cfg.fleet, ack.site), ack.encode(self._signer), qos=1, retain=True)
            return
        self.client.publish(protocol.device_ack(self.cfg.fleet, ack.device), ack.signed(self._signer).to_json(), qos=1, retain=True)

    def publish_status(self, payload: dict[str, object], *, wait: bool = False) -> None:
        info = self.client.publish(protocol.coordinator_status(self.cfg.fleet), json.dumps(payload).encode(), qos=1, retain=True)
        if wait and self.connected.is_set():
            info.wait_for_publish(timeout=2.0)
