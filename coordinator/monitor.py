"""A read-only MQTT observer of a fleet: coordinator status and device heartbeats.

It works from any machine that can reach the broker. Callbacks only enqueue;
:meth:`FleetMonitor.poll` applies what arrived.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from compression import CodecError, protocol
from compression.mqtt import Broker, make_client
from compression.protocol import DeviceStatus


@dataclass
class FleetView:
    coordinator: dict[str, Any] = field(default_factory=dict)
    devices: dict[str, DeviceStatus] = field(default_factory=dict)
    history: list[tuple[float, str, int, float]] = field(default_factory=list)
    """(time, device, version, eval_loss) each time a device reports a held-out loss for a version."""
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    """At a root: each site's status (remapped up its bridge) and ``bridge`` ("up"/"down")."""


class FleetMonitor:
    def __init__(
        self, host: str, port: int, fleet: str, mqtt_protocol: str = "5", *, username: str | None = None, password: str | None = None
    ) -> None:
        self.fleet = fleet
        self.view = FleetView()
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._seen: set[tuple[str, int]] = set()
        settings = Broker(host=host, port=port, protocol=mqtt_protocol, username=username, password=password)
        self.client = make_client(settings, f"monitor-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(
            [(t, 1) for t in (protocol.coordinator_status(fleet), protocol.all_device_status(fleet), *_site_topics(fleet))]
        )
        self.client.on_message = lambda c, u, m: self._inbox.put((m.topic, bytes(m.payload)))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    def poll(self) -> FleetView:
        while True:
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return self.view
            if topic == protocol.coordinator_status(self.fleet):
                try:
                    self.view.coordinator = json.loads(payload)
                except ValueError:
                    continue
                continue
            if topic.startswith(f"fl/{self.fleet}/sites/"):
                self._site(topic, payload)
                continue
            try:
                _, device, _ = protocol.parse_device_topic(topic)
                status = DeviceStatus.from_json(payload)
            except CodecError:
                continue
            self.view.devices[device] = status
            loss = status.metrics.get("eval_loss")
            # A device scores some versions only (train.eval_every): the score names its version.
            scored = status.metrics.get("eval_version", status.version)
            if isinstance(scored, (int, float)) and loss is not None and (device, int(scored)) not in self._seen:
                self._seen.add((device, int(scored)))
                self.view.history.append((time.time(), device, int(scored), loss))

    def _site(self, topic: str, payload: bytes) -> None:
        try:
            _, site, leaf = protocol.parse_site_topic(topic)
        except CodecError:
            return
        entry = self.view.sites.setdefault(site, {})
        if leaf == "bridge":
            entry["bridge"] = {True: "up", False: "down", None: "?"}[protocol.bridge_state(payload)]
        elif (status := protocol.site_status_object(payload)) is not None:
            entry.update(status=status, seen=time.time())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _site_topics(fleet: str) -> tuple[str, str]:
    return protocol.all_site_status(fleet), protocol.all_site_bridges(fleet)
