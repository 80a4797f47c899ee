"""The coordinator's MQTT shell: receive, validate, aggregate, commit, acknowledge, publish.

paho callbacks only enqueue. One worker (the caller of :meth:`CoordinatorService.run`)
handles messages in order, so the global state has a single writer. Updates are
acknowledged to the broker (``manual_ack``) only after they are durably committed or
durably rejected; the broker keeps unacknowledged messages in the coordinator's
persistent session and redelivers them after a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from compression import CodecError, ErrorFeedback, FrameKind, apply_delta, compress_dense, compress_update, protocol, state_digest
from compression.protocol import DeviceStatus, GlobalMeta, TrainableSpec
from coordinator.config import CoordinatorConfig
from coordinator.errors import BrokerError, Rejection, StoreError
from coordinator.initial import initial_state
from coordinator.store import LedgerEntry, Store
from coordinator.strategy import fedasync_step, staleness_weight
from coordinator.validate import validate_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int


class CoordinatorService:
    """Owns the store and the global state; call :meth:`run` to serve until ``stop()``."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.state_dir)
        self.spec, self.version, self.state, self.downlink = self._load_or_init()
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        # Counted once here and kept current in memory: COUNT(*) over the ledger on every
        # update would grow with the fleet's history.
        self.counts = self.store.counts()
        self.inbox: queue.Queue[_Message | str] = queue.Queue()
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self._last_status = 0.0
        self.client = self._make_client()

    def _load_or_init(self) -> tuple[TrainableSpec, int, dict[str, np.ndarray], ErrorFeedback]:
        version = self.store.current_version()
        spec_json = self.store.get_meta("spec")
        if version is not None and spec_json is not None:
            spec = TrainableSpec.from_dict(json.loads(spec_json))
            state, residual = self.store.load_version(version)
            log.info("resuming at version %d (%d tensors)", version, len(state))
            return spec, version, state, ErrorFeedback(residual)
        if version is not None:
            raise StoreError(f"{self.cfg.state_dir}: versions exist but the trainable spec is missing")
        spec, state = initial_state(self.cfg.model)
        self.store.set_meta("spec", json.dumps(spec.to_dict(), sort_keys=True))
        self.store.commit_version(0, state, None, self.cfg.keep_versions)
        log.info("initialised version 0")
        return spec, 0, state, ErrorFeedback()

    # -- MQTT ------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        b = self.cfg.broker
        v5 = b.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"coordinator-{self.cfg.fleet}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if b.username:
            client.username_pw_set(b.username, b.password)
        client.reconnect_delay_set(1, 30)
        client.will_set(protocol.coordinator_status(self.cfg.fleet), json.dumps({"state": "offline"}).encode(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection: %s", reason)
            return
        fleet = self.cfg.fleet
        client.subscribe([(protocol.all_updates(fleet), 1), (protocol.all_device_status(fleet), 1)])
        self.connected.set()
        self.inbox.put("connected")  # the worker republishes the global state

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self.connected.clear()
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put(_Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    def _ack(self, msg: _Message) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    # -- serving ---------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        b = self.cfg.broker
        kwargs: dict[str, object] = {}
        if b.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        try:
            self.client.connect(b.host, b.port, keepalive=b.keepalive, **kwargs)  # type: ignore[arg-type]
        except OSError as exc:
            raise BrokerError(f"cannot connect to the broker at {b.host}:{b.port}: {exc}") from None
        self.client.loop_start()
        try:
            while not self.stop_event.is_set():
                try:
                    item = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    item = None
                if item == "connected":
                    self._publish_global(self.store.delta_frame(self.version))
                elif isinstance(item, _Message):
                    self._handle(item)
                if time.monotonic() - self._last_status >= self.cfg.heartbeat_s:
                    self._publish_status("online")
        finally:
            self._publish_status("offline")
            self.client.disconnect()
            self.client.loop_stop()
            self.store.close()

    def _handle(self, msg: _Message) -> None:
        try:
            fleet, device, leaf = protocol.parse_device_topic(msg.topic)
        except CodecError as exc:
            log.warning("ignored message on %s: %s", msg.topic, exc)
            self._ack(msg)
            return
        if leaf == "update":
            self._handle_update(device, msg)
        elif leaf == "status":
            self._handle_status(device, msg)
        self._ack(msg)

    def _handle_status(self, device: str, msg: _Message) -> None:
        if not msg.payload:
            return  # a cleared retained status
        try:
            status = DeviceStatus.from_json(msg.payload)
        except CodecError as exc:
            log.warning("bad status from %s: %s", device, exc)
            return
        self.store.record_status(device, status.state, status.version, status.profile, status.metrics)

    def _handle_update(self, device: str, msg: _Message) -> None:
        limits = self.cfg.limits
        try:
            valid = validate_update(
                device,
                msg.payload,
                shapes=self.shapes,
                current_version=self.version,
                strategy=self.cfg.strategy,
                max_update_bytes=limits.max_update_bytes,
                max_update_norm=limits.max_update_norm,
                is_known_device=lambda d: limits.allow_unknown_devices,
                is_duplicate=self.store.is_applied,
            )
        except Rejection as rej:
            if rej.reason == "duplicate":
                log.info("duplicate from %s dropped: %s", device, rej.detail)
                return
            log.warning("rejected update from %s: %s", device, rej)
            self.store.record_rejection(device, rej.reason, rej.detail)
            self.counts["rejected"] += 1
            self._publish_status("online")
            return
        h = valid.header
        weight = self.cfg.strategy.alpha * staleness_weight(valid.staleness, self.cfg.strategy)
        # The global step goes out compressed, with the coordinator's own error feedback, and
        # the coordinator applies exactly what it sends: devices that apply the same frame
        # hold bit-identical state, version after version.
        step = fedasync_step(valid.delta, weight)
        down = compress_update(step, self.cfg.downlink, self.downlink, kind=FrameKind.GLOBAL_DELTA)
        new_state = apply_delta(self.state, down.sent)
        new_version = self.version + 1
        entry = LedgerEntry(
            update_id=h.update_id,
            device=h.device,
            seq=h.seq,
            base_version=h.base_version,
            staleness=valid.staleness,
            weight=weight,
            num_samples=h.num_samples,
            size=valid.size,
            train_loss=h.train_loss,
        )
        self.store.commit_version(
            new_version, new_state, entry, self.cfg.keep_versions, residual=down.feedback.residual, delta_frame=down.frame
        )
        self.state, self.version, self.downlink = new_state, new_version, down.feedback
        self.counts["accepted"] += 1
        self.counts["versions"] += 1
        log.info("v%d from %s (staleness %d, weight %.3f, downlink %d B)", new_version, device, valid.staleness, weight, len(down.frame))
        self._publish_global(down.frame)
        self._publish_status("online")

    def _publish_global(self, delta_frame: bytes | None) -> None:
        """Publish the current version retained: delta, snapshot, then meta (the meta names both)."""
        snapshot = compress_dense(self.state, FrameKind.SNAPSHOT, self.cfg.snapshot_zstd_level)
        fleet = self.cfg.fleet
        delta_fields: dict[str, object] = {}
        if delta_frame is not None and self.version > 0:
            delta_fields = {
                "delta_base_version": self.version - 1,
                "delta_sha256": hashlib.sha256(delta_frame).hexdigest(),
                "delta_bytes": len(delta_frame),
            }
            self.client.publish(protocol.global_delta(fleet), delta_frame, qos=1, retain=True)
        meta = GlobalMeta(
            version=self.version,
            snapshot_sha256=hashlib.sha256(snapshot).hexdigest(),
            snapshot_bytes=len(snapshot),
            created=time.time(),
            state_sha256=state_digest(self.state),
            model=self.spec.to_dict(),
            **delta_fields,  # type: ignore[arg-type]
        )
        self.client.publish(protocol.global_snapshot(fleet), snapshot, qos=1, retain=True)
        self.client.publish(protocol.global_meta(fleet), meta.to_json(), qos=1, retain=True)

    def _publish_status(self, state: str) -> None:
        self._last_status = time.monotonic()
        counts = dict(self.counts) if state == "online" else {}
        payload = {"state": state, "version": self.version, "ts": time.time(), **counts}
        info = self.client.publish(protocol.coordinator_status(self.cfg.fleet), json.dumps(payload).encode(), qos=1, retain=True)
        if state == "offline" and self.connected.is_set():
            info.wait_for_publish(timeout=2.0)
