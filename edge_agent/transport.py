"""The agent's MQTT shell: paho-mqtt 2.x, MQTT v5, QoS 1, retained status with a Last Will.

paho callbacks only enqueue; the agent's main loop does the work. paho reconnects on its
own network thread; before each attempt the delay is re-drawn from a jittered
exponential :class:`~edge_agent.backoff.Backoff`, reset by a successful CONNACK.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from compression import protocol
from compression.mqtt import ClientSetupError, make_client
from edge_agent.backoff import Backoff
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError, PublishRefused, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes


class AgentTransport:
    """Connects, subscribes to the global model and commands, publishes updates and status."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.connected = threading.Event()
        self._want_snapshot = True
        self._acks: dict[int, int] = {}
        self._ack_cond = threading.Condition()
        b = cfg.broker
        # The client id is the device's identity, as the broker's use_username_as_clientid
        # makes it anyway: a device never picks another's id.
        try:
            self.client = make_client(b, b.username or cfg.device_id)
        except ClientSetupError as exc:
            raise ConfigError(str(exc)) from None
        self.backoff = Backoff(b.reconnect_min_s, b.reconnect_max_s)
        self.reconnects = 0
        self._next_delay()
        self.client.max_queued_messages_set(1000)
        offline = protocol.DeviceStatus(state="offline").to_json()
        self.client.will_set(protocol.device_status(cfg.fleet, cfg.device_id), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def start(self) -> None:
        b = self.cfg.broker
        try:
            self.client.connect_async(b.host, b.port, keepalive=b.keepalive)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {b.host}:{b.port}: {exc}") from None
        self.client.loop_start()

    def stop(self, final_status: bytes | None = None) -> None:
        if final_status is not None and self.connected.is_set():
            try:
                self.publish(protocol.device_status(self.cfg.fleet, self.cfg.device_id), final_status, retain=True, timeout=2.0)
            except TransportError as exc:
                log.warning("could not publish the final status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def following_snapshot(self) -> bool:
        """Whether the agent is subscribed to the snapshot topic (only while out of sync)."""
        return self._want_snapshot

    def want_snapshot(self, wanted: bool) -> None:
        """Follow the 1.8 MB-per-version snapshot topic only while this device is out of sync."""
        if wanted == self._want_snapshot:
            return
        self._want_snapshot = wanted
        if self.connected.is_set():
            topic = protocol.global_snapshot(self.cfg.fleet)
            if wanted:
                self.client.subscribe(topic, qos=1)
            else:
                self.client.unsubscribe(topic)

    def _next_delay(self) -> float:
        delay = self.backoff.next()
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # paho accepts float seconds
        return delay

    # -- paho callbacks: enqueue only ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection: %s", reason)
            return
        fleet = self.cfg.fleet
        # Delta before meta: retained messages arrive in subscription order, and a device
        # that already holds the previous version then needs nothing else.
        topics = [protocol.global_delta(fleet)]
        if self._want_snapshot:
            topics.append(protocol.global_snapshot(fleet))
        topics += [
            protocol.global_meta(fleet),
            protocol.device_cmd(fleet, self.cfg.device_id),
            protocol.device_ack(fleet, self.cfg.device_id),
            protocol.device_invites(fleet, self.cfg.device_id),
            protocol.device_secagg_inbox(fleet, self.cfg.device_id),
        ]
        client.subscribe([(t, 1) for t in topics])
        self.backoff.reset()
        self._next_delay()
        self.connected.set()
        log.info("connected to %s:%d", self.cfg.broker.host, self.cfg.broker.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        delay = self._next_delay()
        if was_connected:
            self.reconnects += 1
            log.warning("disconnected from the broker (%s); reconnecting in %.1fs", reason, delay)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        delay = self._next_delay()
        log.info("broker %s:%d unreachable; next attempt in %.1fs", self.cfg.broker.host, self.cfg.broker.port, delay)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if len(msg.payload) > self.cfg.broker.max_global_bytes:
            log.warning("dropped a %d-byte message on %s: above broker.max_global_bytes", len(msg.payload), msg.topic)
            return
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload)))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        with self._ack_cond:
            self._acks[mid] = int(getattr(reason, "value", 0))
            while len(self._acks) > 4096:  # heartbeat acks nobody waits for
                self._acks.pop(next(iter(self._acks)))
            self._ack_cond.notify_all()

    # -- publishing ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 30.0) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK. Raises TransportError on refusal or timeout."""
        if len(payload) > self.cfg.broker.max_message_bytes:
            raise PublishRefused(f"message of {len(payload)} bytes exceeds broker.max_message_bytes={self.cfg.broker.max_message_bytes}")
        if not self.connected.wait(timeout):
            raise TransportError("not connected to the broker")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: info.mid in self._acks, timeout):
                raise TransportError(f"no PUBACK for {topic} within {timeout:.0f}s")
            code = self._acks.pop(info.mid)
        if code >= 0x80:
            raise PublishRefused(f"broker refused the publish to {topic} with reason code {code}")

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Fire a QoS 1 publish without waiting (status heartbeats)."""
        if self.connected.is_set():
            self.client.publish(topic, payload, qos=1, retain=retain)
