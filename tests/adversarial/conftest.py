"""A secured fleet to attack: Mosquitto with the shipped ACL and broker settings, a password
file, enrolled devices, and a coordinator with the production defaults.

The attacks come from :class:`RawClient`: plain paho with hand-built envelopes, not the
project's publishing code, as a third-party client would send them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from compression import FrameKind, decode_frame, encode_frame, protocol
from compression.frame import SparseTensor
from compression.mqtt import loopback, make_client
from compression.protocol import GlobalMeta
from coordinator.broker_acl import render_acl
from coordinator.enrolment import enroll, set_password
from coordinator.store import Store
from fedge_lab.broker import MosquittoBroker
from fedge_lab.demo import write_toml
from fedge_lab.processes import Child
from tests.conftest import wait_until

FLEET = "test"
COORD_PASSWORD = "coordinator-secret"
SHIPPED_BROKER = "use_username_as_clientid true\n"
"""The identity setting of devices/mosquitto/mosquitto.conf (the rest of it is TLS and paths)."""


def envelope(device: str, seq: int, frame: bytes, key_pem: bytes | None, *, base: int, samples: int = 4, uid: str | None = None) -> bytes:
    """``FEV2 | u32 | header JSON | u8 | signature | frame``, built by hand (docs/wire-format.md)."""
    head = {
        "base_version": base,
        "device": device,
        "frame_sha256": hashlib.sha256(frame).hexdigest(),
        "num_samples": samples,
        "seq": seq,
        "timestamp": time.time(),
        "train_loss": None,
        "update_id": uid or f"{device}-{seq}-{uuid.uuid4().hex[:6]}",
    }
    raw = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
    if key_pem is None:
        return b"FEV1" + struct.pack("<I", len(raw)) + raw + frame
    key = serialization.load_pem_private_key(key_pem, password=None)
    sig = key.sign(b"fedge update v1\x00" + raw)  # type: ignore[union-attr, call-arg]
    return b"FEV2" + struct.pack("<I", len(raw)) + raw + bytes([len(sig)]) + sig + frame


def dense_frame(state: dict[str, np.ndarray], value: float) -> bytes:
    return encode_frame(FrameKind.UPDATE, {k: SparseTensor(v.shape, np.full(v.size, value, np.float32)) for k, v in state.items()})


class RawClient:
    """A third-party MQTT v5 client: chooses its own client id and session, reads PUBACK reason codes."""

    def __init__(self, port: int, user: str | None, password: str | None, client_id: str, *, clean_start: bool = True) -> None:
        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.disconnects = 0
        self.cond = threading.Condition()
        self.client = make_client(loopback(port, username=user, password=password), client_id)
        self.client.on_connect = lambda c, u, f, r, p: self.connected.set() if not r.is_failure else None
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10), "the broker did not accept the connection"

    def _on_disconnect(self, *args: object) -> None:
        self.disconnects += 1
        self.connected.clear()

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, reason: object, props: object) -> None:
        with self.cond:
            self.acks[mid] = int(getattr(reason, "value", 0))
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, 10), "no PUBACK"
            return self.acks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class SecureFleet:
    root: Path
    broker: MosquittoBroker
    state: Path
    coord_cfg: Path
    keys: dict[str, bytes] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)
    coordinator: Child | None = None

    def start_coordinator(self, init: bool = False) -> Child:
        argv = [sys.executable, "-m", "coordinator", "serve", "--config", str(self.coord_cfg)] + (["--init"] if init else [])
        self.coordinator = Child("coordinator", argv, self.root / "coord.log").start()
        return self.coordinator

    def stop_coordinator(self) -> None:
        if self.coordinator is not None:
            self.coordinator.stop()
            self.coordinator = None

    def device(self, name: str, client_id: str | None = None) -> RawClient:
        return RawClient(self.broker.port, name, self.passwords[name], client_id or name)

    def store(self) -> Store:
        return Store(self.state, readonly=True)

    def version(self) -> int:
        """The committed version; -1 while the coordinator has not created its database."""
        import sqlite3

        from coordinator.errors import StoreError

        try:
            s = self.store()
        except StoreError:
            return -1
        try:
            v = s.current_version()
            return -1 if v is None else int(v)
        except sqlite3.Error:
            return -1
        finally:
            s.close()

    def rejections(self) -> dict[str, int]:
        s = self.store()
        try:
            return s.rejection_counts()
        finally:
            s.close()

    def ledger(self) -> list[dict]:
        s = self.store()
        try:
            return list(s.ledger())
        finally:
            s.close()

    def global_state(self) -> tuple[int, dict[str, np.ndarray]]:
        """The retained global version, as a device sees it."""
        c = RawClient(self.broker.port, "operator", self.passwords["operator"], "operator")
        try:
            c.client.subscribe([(protocol.global_meta(FLEET), 1), (protocol.global_snapshot(FLEET), 1)])

            def pair() -> tuple[GlobalMeta, bytes] | None:
                metas = [GlobalMeta.from_json(p) for t, p in c.messages if t.endswith("/meta")]
                snaps = {hashlib.sha256(p).hexdigest(): p for t, p in c.messages if t.endswith("/snapshot")}
                for m in reversed(metas):
                    if m.snapshot_sha256 in snaps:
                        return m, snaps[m.snapshot_sha256]
                return None

            meta, snap = wait_until(pair, 20, "the retained global state")  # type: ignore[misc]
            return meta.version, decode_frame(snap).dense()
        finally:
            c.close()


def start_secure_fleet(root: Path, tiny_model: Path, *, broker_extra: str = "", coordinator: dict | None = None) -> SecureFleet:
    state, passwd = root / "coord" / "state", root / "passwd"
    fleet = SecureFleet(root, None, state, root / "coord" / "coordinator.toml")  # type: ignore[arg-type]
    for device in ("dev-a", "dev-b"):
        report = enroll(state, device, root / device, fleet=FLEET, broker_host="127.0.0.1", broker_port=1883, password_file=passwd)
        snippet = (root / device / "agent.toml").read_text()
        fleet.passwords[device] = snippet.split('password = "')[1].split('"')[0]
        fleet.keys[device] = (root / device / f"{device}.key").read_bytes()
        fleet.fleet_public = report["fleet_public_key"]  # type: ignore[attr-defined]
    set_password(passwd, "coordinator", COORD_PASSWORD)
    set_password(passwd, "operator", "operator-secret")
    fleet.passwords.update(coordinator=COORD_PASSWORD, operator="operator-secret")
    acl = root / "acl"
    acl.write_text(render_acl(FLEET))
    extra = f"password_file {passwd}\nacl_file {acl}\n{SHIPPED_BROKER}{broker_extra}"
    fleet.broker = MosquittoBroker(root / "broker", persistence=True, anonymous=False, extra=extra).start()
    write_toml(
        fleet.coord_cfg,
        {
            "fleet": FLEET,
            "state_dir": "state",
            "heartbeat_s": 1.0,
            "broker": {"port": fleet.broker.port, "username": "coordinator", "password": COORD_PASSWORD},
            "model": {"source": str(tiny_model), "lora_r": 4, "lora_alpha": 8},
            **(coordinator or {}),
        },
    )
    return fleet


@pytest.fixture
def secure_fleet(tmp_path: Path, mosquitto_binary: str, tiny_model: Path) -> Iterator[SecureFleet]:
    fleet = start_secure_fleet(tmp_path, tiny_model)
    fleet.start_coordinator(init=True)
    wait_until(lambda: fleet.version() == 0, 60, "version 0")
    fleet.global_state()  # barrier: the coordinator publishes it after it has subscribed
    try:
        yield fleet
    finally:
        fleet.stop_coordinator()
        fleet.broker.stop()
