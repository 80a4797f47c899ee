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
from dataclasses import dataclass, replace

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from compression import (
    CodecError,
    ErrorFeedback,
    FrameKind,
    apply_delta,
    compress_dense,
    compress_update,
    decode_frame,
    protocol,
    state_digest,
)
from compression.frame import SparseTensor
from compression.protocol import DeviceStatus, GlobalMeta, TrainableSpec
from coordinator.config import CoordinatorConfig
from coordinator.errors import BrokerError, Rejection, StoreError
from coordinator.identity import Verifier
from coordinator.initial import initial_state
from coordinator.metrics import Metrics
from coordinator.privacy import dp_mean, epsilon
from coordinator.ratelimit import RateLimiter
from coordinator.store import BufferedUpdate, LedgerEntry, Store
from coordinator.strategy import WeightedUpdate, buffered_step, fedasync_step, fedasync_weight, staleness_weight, update_weights
from coordinator.validate import ValidUpdate, validate_update

log = logging.getLogger(__name__)

BATCH_MAX = 64
"""Queued messages handled in one transaction (one fsync)."""


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received: float = 0.0


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
        self.rejections = self.store.rejection_counts()
        self.buffer = self.store.buffered()  # accepted before a restart, not yet aggregated
        # Decoded (sparse) tensors of the buffered updates, by update id: decoded once, on arrival.
        self._decoded: dict[str, dict[str, SparseTensor]] = {b.entry.update_id: dict(decode_frame(b.frame).tensors) for b in self.buffer}
        self.online: dict[str, bool] = {}
        self._round_online: dict[str, bool] = {}
        self._round_started = time.monotonic()
        self._new_versions: list[tuple[int, dict[str, np.ndarray], bytes]] = []
        limits = cfg.limits
        self.rate = RateLimiter(limits.max_updates_per_minute, limits.rate_burst)
        self.verifier = Verifier(
            self.store, allow_unknown=limits.allow_unknown_devices or bool(limits.devices), require_signatures=limits.require_signatures
        )
        self.dp = cfg.dp
        self.participations = self.store.participations()
        self._dp_rng = np.random.default_rng(cfg.dp.seed)
        if cfg.dp.enabled:
            self.store.set_meta("dp", json.dumps({"noise_multiplier": cfg.dp.noise_multiplier, "delta": cfg.dp.delta}))
        self.metrics = Metrics(cfg.fleet)
        self.metrics.version.set(self.version)
        self.metrics.buffered.set(len(self.buffer))
        self.metrics.epsilon_max.set(self.fleet_epsilon())
        self.metrics_port: int | None = None
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
        self.inbox.put(_Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.monotonic()))

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
        if self.cfg.metrics_port:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
        try:
            while not self.stop_event.is_set():
                try:
                    first = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    first = None
                batch: list[_Message | str] = [] if first is None else [first]
                while len(batch) < BATCH_MAX:
                    try:
                        batch.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                if "connected" in batch:
                    self._publish_global(self.store.delta_frame(self.version))
                messages = [m for m in batch if isinstance(m, _Message)]
                if messages:
                    self._process(messages)
                self._maybe_close_round()
                if time.monotonic() - self._last_status >= self.cfg.heartbeat_s:
                    self._publish_status("online")
        finally:
            self._publish_status("offline")
            self.client.disconnect()
            self.client.loop_stop()
            self.metrics.close()
            self.store.close()

    def _process(self, messages: list[_Message]) -> None:
        """Handle queued messages in one transaction (group commit), then publish, then acknowledge.

        Nothing is acknowledged or published before the commit: a crash inside the batch
        loses only unacknowledged work, which the broker redelivers.
        """
        self._new_versions = []
        with self.store.batch():
            for msg in messages:
                self._handle(msg)
        for _version, state, frame in self._new_versions:
            self._publish_global(frame, state=state, version=_version)
        now = time.monotonic()
        for msg in messages:
            self._ack(msg)
            if msg.topic.endswith("/update"):
                self.metrics.latency.observe(now - msg.received)
        self.metrics.version.set(self.version)
        self.metrics.buffered.set(len(self.buffer))
        self.metrics.devices_online.set(sum(1 for on in self.online.values() if on))
        if self._new_versions or any(m.topic.endswith("/update") for m in messages):
            self._publish_status("online")
        self._new_versions = []

    def _handle(self, msg: _Message) -> None:
        try:
            fleet, device, leaf = protocol.parse_device_topic(msg.topic)
        except CodecError as exc:
            log.warning("ignored message on %s: %s", msg.topic, exc)
            return
        if leaf == "update":
            self._handle_update(device, msg)
        elif leaf == "status":
            self._handle_status(device, msg)

    def _handle_status(self, device: str, msg: _Message) -> None:
        if not msg.payload:
            return  # a cleared retained status
        try:
            status = DeviceStatus.from_json(msg.payload)
        except CodecError as exc:
            log.warning("bad status from %s: %s", device, exc)
            return
        self.online[device] = status.state != "offline"
        self.store.record_status(device, status.state, status.version, status.profile, status.metrics, status.tier)

    def _reject(self, device: str, rej: Rejection) -> None:
        log.warning("rejected update from %s: %s", device, rej)
        self.store.record_rejection(device, rej.reason, rej.detail)
        self.counts["rejected"] += 1
        self.rejections[rej.reason] = self.rejections.get(rej.reason, 0) + 1
        self.metrics.reject(rej.reason)

    def _is_known(self, device: str) -> bool:
        return self.cfg.limits.allow_unknown_devices or device in self.cfg.limits.devices

    def _handle_update(self, device: str, msg: _Message) -> None:
        limits = self.cfg.limits
        if not self.rate.allow(device):
            self._reject(device, Rejection("rate_limited", f"more than {limits.max_updates_per_minute:g} updates a minute"))
            return
        try:
            valid = validate_update(
                device,
                msg.payload,
                shapes=self.shapes,
                current_version=self.version,
                strategy=self.cfg.strategy,
                max_update_bytes=limits.max_update_bytes,
                max_update_norm=limits.max_update_norm,
                is_known_device=self._is_known,
                is_duplicate=self.store.is_applied,
                check_identity=self.verifier.check,
            )
        except Rejection as rej:
            if rej.reason == "duplicate":
                log.info("duplicate from %s dropped: %s", device, rej.detail)
                return
            self._reject(device, rej)
            return
        if self.dp.enabled:
            try:
                self._dp_admit(valid.header.device)
            except Rejection as rej:
                self._reject(device, rej)
                return
        self.store.advance_seq(valid.header.device, valid.header.seq)  # replay protection, in this batch's transaction
        self.metrics.accepted.inc()
        self.metrics.staleness.observe(valid.staleness)
        if self.cfg.strategy.kind == "fedasync":
            weight = fedasync_weight(valid.staleness, self.cfg.strategy)
            self._commit_step(fedasync_step(valid.delta, weight), [self._entry(valid, weight)])
            return
        entry = self._entry(valid, 0.0)
        self.store.add_to_buffer(entry, valid.frame)
        self.buffer.append(BufferedUpdate(entry, valid.frame))
        self._decoded[entry.update_id] = valid.tensors
        if self.cfg.strategy.kind == "fedbuff" and len(self.buffer) >= self.cfg.strategy.buffer_size:
            self._aggregate_buffer()
        # FedAvg rounds close in the worker loop, after this batch has committed (see run()).

    # The service uses RDP: microseconds per call, and never below PLD, so enforcing a budget
    # with it cannot overspend. `status` and `devices` report the tighter PLD value.
    def device_epsilon(self, device: str, extra: int = 0) -> float:
        return epsilon(self.participations.get(device, 0) + extra, self.dp.noise_multiplier, self.dp.delta, "rdp")

    def fleet_epsilon(self) -> float:
        if not self.dp.enabled or not self.participations:
            return 0.0
        return epsilon(max(self.participations.values()), self.dp.noise_multiplier, self.dp.delta, "rdp")

    def _dp_admit(self, device: str) -> None:
        """DP-FedBuff admission: one update per device per buffer, and the privacy budget."""
        if any(b.entry.device == device for b in self.buffer):
            raise Rejection("one_per_buffer", f"{device} already has an update in this DP buffer")
        budget, enforce = self.dp.epsilon_budget, self.dp.enforce
        if budget <= 0 or enforce == "off":
            return
        if enforce == "fleet" and (spent := self.fleet_epsilon()) >= budget:
            raise Rejection("privacy_budget", f"the fleet has spent its privacy budget (epsilon {spent:.3g} >= {budget:g})")
        if enforce == "device" and (after := self.device_epsilon(device, extra=1)) > budget:
            raise Rejection("privacy_budget", f"{device} would exceed its privacy budget (epsilon {after:.3g} > {budget:g})")

    @staticmethod
    def _entry(valid: ValidUpdate, weight: float) -> LedgerEntry:
        h = valid.header
        return LedgerEntry(
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

    def _aggregate_buffer(self) -> None:
        """FedBuff (or a FedAvg round): one version from every buffered update."""
        updates = []
        for b in self.buffer:
            tensors = self._decoded.pop(b.entry.update_id, None) or dict(decode_frame(b.frame).tensors)
            updates.append(WeightedUpdate(tensors, b.entry.num_samples, self.version - b.entry.base_version))
        if self.dp.enabled:
            deltas = [{n: t.to_dense() if isinstance(t, SparseTensor) else t for n, t in u.delta.items()} for u in updates]
            weights_s = [staleness_weight(u.staleness, self.cfg.strategy) for u in updates]
            mean = dp_mean(deltas, self.shapes, weights_s, self.dp, self.cfg.strategy.buffer_size, self._dp_rng)
            step = {n: (np.float32(self.cfg.strategy.server_lr) * v).astype(np.float32) for n, v in mean.items()}
            devices = [b.entry.device for b in self.buffer]
            self.store.add_participations(devices)
            for d in devices:
                self.participations[d] = self.participations.get(d, 0) + 1
            self.metrics.epsilon_max.set(self.fleet_epsilon())
        else:
            step = buffered_step(updates, self.cfg.strategy)
        names = sorted({n for u in updates for n in u.delta})
        weights: dict[int, float] = {}
        for name in names:
            for i, w in update_weights(updates, name, self.cfg.strategy, stale=self.cfg.strategy.kind != "fedavg"):
                weights[i] = max(weights.get(i, 0.0), w)
        entries = []
        for i, (b, u) in enumerate(zip(self.buffer, updates, strict=True)):
            entries.append(replace(b.entry, staleness=u.staleness, weight=weights.get(i, 0.0)))
        self._commit_step(step, entries)
        self.buffer = []

    def _maybe_close_round(self) -> None:
        """FedAvg: close the round when enough updates came, or at the deadline with the minimum."""
        s = self.cfg.strategy
        if s.kind != "fedavg" or not self.buffer:
            return
        assert not self.store.in_batch, "a round closes only between batches, so that it publishes after its commit"
        # The devices online when the round began; a round that began with none online (the
        # coordinator started before its fleet) waits for the devices online now.
        online = sum(1 for on in self._round_online.values() if on) or sum(1 for on in self.online.values() if on)
        target = s.round_participants or max(s.min_participants, online)
        waited = time.monotonic() - self._round_started
        if len(self.buffer) >= target or (waited >= s.round_deadline_s and len(self.buffer) >= s.min_participants):
            log.info("round %d closes with %d updates after %.0fs (target %d)", self.version, len(self.buffer), waited, target)
            with self.store.batch():
                self._aggregate_buffer()
            for version, state, frame in self._new_versions:
                self._publish_global(frame, state=state, version=version)
            self._new_versions = []

    def _commit_step(self, step: dict[str, np.ndarray], entries: list[LedgerEntry]) -> None:
        """Send the global step through the downlink codec, apply exactly what is sent, commit."""
        # The global step goes out compressed, with the coordinator's own error feedback, and
        # the coordinator applies exactly what it sends: devices that apply the same frame
        # hold bit-identical state, version after version.
        down = compress_update(step, self.cfg.downlink, self.downlink, kind=FrameKind.GLOBAL_DELTA)
        new_state = apply_delta(self.state, down.sent)
        new_version = self.version + 1
        self.store.commit_version(
            new_version, new_state, entries, self.cfg.keep_versions, residual=down.feedback.residual, delta_frame=down.frame
        )
        self.state, self.version, self.downlink = new_state, new_version, down.feedback
        self.counts["accepted"] += len(entries)
        self.metrics.applied.inc(len(entries))
        self.counts["versions"] += 1
        self._round_started = time.monotonic()
        self._round_online = dict(self.online)
        devices = ",".join(sorted({e.device for e in entries}))
        log.info("v%d from %d update(s) (%s), downlink %d B", new_version, len(entries), devices, len(down.frame))
        self._new_versions.append((new_version, new_state, down.frame))

    def _publish_global(self, delta_frame: bytes | None, *, state: dict[str, np.ndarray] | None = None, version: int | None = None) -> None:
        """Publish a version retained: delta, snapshot, then meta (the meta names both)."""
        state = self.state if state is None else state
        version = self.version if version is None else version
        snapshot = compress_dense(state, FrameKind.SNAPSHOT, self.cfg.snapshot_zstd_level)
        fleet = self.cfg.fleet
        delta_fields: dict[str, object] = {}
        if delta_frame is not None and version > 0:
            delta_fields = {
                "delta_base_version": version - 1,
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
            model=self.spec.to_dict(),
            **delta_fields,  # type: ignore[arg-type]
        )
        self.client.publish(protocol.global_snapshot(fleet), snapshot, qos=1, retain=True)
        self.client.publish(protocol.global_meta(fleet), meta.to_json(), qos=1, retain=True)

    def _publish_status(self, state: str) -> None:
        self._last_status = time.monotonic()
        counts = dict(self.counts) if state == "online" else {}
        payload: dict[str, object] = {"state": state, "version": self.version, "ts": time.time(), **counts}
        if state == "online":
            payload.update(strategy=self.cfg.strategy.kind, buffered=len(self.buffer), rejections=dict(self.rejections))
            if self.dp.enabled:
                payload.update(dp_epsilon=round(self.fleet_epsilon(), 4), dp_delta=self.dp.delta)
        info = self.client.publish(protocol.coordinator_status(self.cfg.fleet), json.dumps(payload).encode(), qos=1, retain=True)
        if state == "offline" and self.connected.is_set():
            info.wait_for_publish(timeout=2.0)
