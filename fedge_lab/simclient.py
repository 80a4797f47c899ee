"""One MQTT connection of a simulated fleet, driven by the fleet's selector loop (paho's external-loop
API): a device's own connection, or the fleet's shared subscription to the global versions."""

from __future__ import annotations

import logging
import selectors
import socket
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from compression import protocol
from compression.mqtt import Broker, make_client

if TYPE_CHECKING:
    from fedge_lab.simfleet import SimFleet, _Device

log = logging.getLogger(__name__)

RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 10.0


class SimClient:
    """One MQTT connection driven by the fleet's selector loop."""

    def __init__(self, fleet: SimFleet, client_id: str, device: _Device | None) -> None:
        self.fleet = fleet
        self.device = device
        plan = fleet.plan
        self.mqtt = make_client(Broker(protocol=plan.protocol, username=plan.username, password=plan.password), client_id)
        self.mqtt.on_socket_open = self._sock_open
        self.mqtt.on_socket_close = self._sock_close
        self.mqtt.on_socket_register_write = self._want_write
        self.mqtt.on_socket_unregister_write = self._done_writing
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_publish = self._on_publish
        self.connected = False
        self.backoff = RECONNECT_MIN_S
        self.refused = 0
        self.unacked: dict[int, str] = {}
        """Log lines of updates published and not yet acknowledged, by message id."""

    def _sock_open(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        self.fleet.sel.register(sock, selectors.EVENT_READ, self)

    def _want_write(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        self.fleet.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)

    def _done_writing(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        self.fleet.sel.modify(sock, selectors.EVENT_READ, self)

    def _sock_close(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        try:
            self.fleet.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def connect(self) -> None:
        props = None
        if self.fleet.plan.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
        try:
            self.mqtt.connect(self.fleet.plan.host, self.fleet.plan.port, keepalive=30, properties=props)
        except OSError as exc:
            self._retry(f"connect failed: {exc}")

    def _retry(self, why: str) -> None:
        self.connected = False
        delay = self.backoff * (0.5 + 0.5 * self.fleet.rng.random())
        self.backoff = min(RECONNECT_MAX_S, self.backoff * 2)
        log.debug("%s: %s; reconnecting in %.1fs", self.mqtt._client_id, why, delay)
        self.fleet.at(time.time() + delay, self.connect_again)

    def connect_again(self) -> None:
        if self.connected or self.fleet.stopping:
            return
        if self.device is not None and self.device.down_until > time.time():
            return
        try:
            self.mqtt.reconnect()
        except OSError as exc:
            self._retry(f"reconnect failed: {exc}")

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.fleet.counts["connect_refused"] += 1
            self.mqtt.disconnect()
            self._retry(f"CONNACK {reason}")
            return
        self.connected = True
        self.backoff = RECONNECT_MIN_S
        self.fleet.counts["connects"] += 1
        if self.device is None:
            c.subscribe([(t, 1) for t in self.fleet.mirror.topics])
        else:
            fleet, dev = self.fleet.plan.fleet, self.device.spec.id
            c.subscribe([(protocol.device_cmd(fleet, dev), 1), (protocol.device_invites(fleet, dev), 1)])
            self.device.on_connected()

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.fleet.counts["disconnects"] += 1
        if not self.fleet.stopping and (self.device is None or self.device.down_until <= time.time()):
            self._retry(f"disconnected ({reason})")

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.device is None:
            self.fleet.mirror.handle(msg.topic, bytes(msg.payload))
        elif "/cohorts/" in msg.topic:
            self.device.on_invite(bytes(msg.payload))
        else:
            self.device.on_command(bytes(msg.payload))

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        line = self.unacked.pop(mid, None)
        if getattr(reason, "is_failure", False):
            self.refused += 1
            self.fleet.counts["refused"] += 1
        elif line is not None:
            self.fleet.log.write(line)

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a device that loses power does."""
        sock: Any = self.mqtt.socket()
        self.connected = False
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.mqtt.loop_read()  # notices the closed socket and cleans up
