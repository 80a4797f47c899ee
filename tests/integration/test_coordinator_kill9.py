"""The coordinator killed with -9 at random moments under load, 20 times: no acknowledged update lost or applied twice."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from compression import CodecConfig, compress_update, protocol
from compression.mqtt import loopback, make_client
from compression.protocol import GlobalMeta, UpdateHeader
from coordinator.store import Store
from fedge_lab.broker import MosquittoBroker
from fedge_lab.demo import LAB_LIMITS, serve_argv, write_toml
from fedge_lab.processes import Child
from tests.conftest import wait_until
from tests.integration.conftest import FLEET

pytestmark = pytest.mark.broker

KILLS = 20


def _version(state: Path) -> int | None:
    """The committed version, or None while the coordinator has not created its database yet."""
    import sqlite3

    from coordinator.errors import StoreError

    try:
        store = Store(state, readonly=True)
    except StoreError:
        return None
    try:
        return store.current_version()
    except sqlite3.OperationalError:
        return None
    finally:
        store.close()


class LoadGenerator:
    """Devices that publish small real updates as fast as the broker takes them (QoS 1).

    ``acked`` holds the update ids the broker acknowledged: from then on the broker owes
    them to the coordinator's persistent session, whatever happens to the coordinator.
    """

    def __init__(self, port: int, devices: int, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.version = 0
        self.acked: set[str] = set()
        self.stop = threading.Event()
        client_id = f"load-{uuid.uuid4().hex[:6]}"
        self.client = make_client(loopback(port), client_id)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(protocol.global_meta(FLEET), qos=1)
        self.client.on_message = self._on_meta
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.devices = [f"load-{i}" for i in range(devices)]
        self.seq = dict.fromkeys(self.devices, 0)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_meta(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        self.version = max(self.version, GlobalMeta.from_json(msg.payload).version)

    def _payload(self, device: str, rng: np.random.Generator) -> tuple[str, bytes]:
        delta = {k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in self.shapes.items()}
        frame = compress_update(delta, CodecConfig()).frame
        self.seq[device] += 1
        uid = f"{device}-{self.seq[device]}-{uuid.uuid4().hex[:6]}"
        header = UpdateHeader(
            device=device,
            seq=self.seq[device],
            update_id=uid,
            base_version=self.version,
            num_samples=4,
            timestamp=time.time(),
            frame_sha256=hashlib.sha256(frame).hexdigest(),
        )
        return uid, protocol.encode_envelope(header, frame)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        i = 0
        while not self.stop.is_set() and i < 100_000:
            device = self.devices[i % len(self.devices)]
            uid, payload = self._payload(device, rng)
            info = self.client.publish(protocol.device_update(FLEET, device), payload, qos=1)
            info.wait_for_publish(timeout=10)
            if info.is_published():
                self.acked.add(uid)
            i += 1
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        self.client.disconnect()
        self.client.loop_stop()


def test_kill_9_under_load_loses_nothing_and_applies_nothing_twice(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_toml(
        tmp_path / "coordinator.toml",
        {
            "fleet": FLEET,
            "state_dir": "state",
            "limits": LAB_LIMITS,
            "heartbeat_s": 1.0,
            "keep_versions": 4,
            "broker": {"port": broker.port},
            "model": {"source": str(tiny_model), "lora_r": 4, "lora_alpha": 8},
            "strategy": {"kind": "fedasync", "max_staleness": 100000},
        },
    )
    coordinator = Child("coordinator", serve_argv(cfg), tmp_path / "coord.log")
    coordinator.start()
    state = tmp_path / "state"
    wait_until(lambda: _version(state) is not None, 60, "version 0")
    v0, _ = Store(state, readonly=True).load_version(0)
    load = LoadGenerator(broker.port, devices=5, shapes={k: v.shape for k, v in v0.items()})
    load.thread.start()
    rng = random.Random(5)
    restart_times = []
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.5))
            os.kill(coordinator.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            coordinator.proc.wait(10)  # type: ignore[union-attr]
            before = _version(state) or 0
            t0 = time.monotonic()
            coordinator.start()
            # Restarted: it republishes its version and applies new updates again.
            wait_until(lambda before=before: (_version(state) or 0) > before, 30, "progress after a restart")
            restart_times.append(time.monotonic() - t0)
        load.close()
        acked = set(load.acked)
        assert len(acked) > 100
        # Let the coordinator drain what the broker still holds for it.
        wait_until(lambda: {e["update_id"] for e in Store(state, readonly=True).ledger()} >= acked, 60, "every acknowledged update")
        time.sleep(1.0)
    finally:
        load.stop.set()
        coordinator.stop()
    store = Store(state, readonly=True)
    ledger = list(store.ledger())
    ids = [e["update_id"] for e in ledger]
    assert len(ids) == len(set(ids))
    assert set(ids) == acked, "an update the broker acknowledged was lost, or an unknown one applied"
    versions = [e["applied_version"] for e in ledger]
    # FedAsync: one version per update, in strictly increasing order, with no gaps.
    assert versions == list(range(1, len(ids) + 1))
    assert store.current_version() == len(ids)
    assert sum(store.rejection_counts().values()) == 0
    assert max(restart_times) < 5.0, restart_times
