"""Integration helpers: a coordinator in a thread or a process, and a device-side MQTT client."""

from __future__ import annotations

import hashlib
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from compression import CodecConfig, compress_update, decode_frame, protocol
from compression.mqtt import loopback, make_client
from compression.protocol import GlobalMeta, UpdateHeader
from coordinator.config import BrokerConfig, CoordinatorConfig, LimitsConfig, ModelSpecConfig
from coordinator.service import CoordinatorService
from fedge_lab.broker import Broker, MosquittoBroker
from fedge_lab.demo import LAB_LIMITS, serve_argv, write_toml
from fedge_lab.processes import Child

FLEET = "test"


def coordinator_config(broker: Broker, state_dir: Path, model: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        state_dir=str(state_dir),
        fleet=FLEET,
        heartbeat_s=1.0,
        broker=BrokerConfig(port=broker.port),
        model=ModelSpecConfig(source=str(model), lora_r=4, lora_alpha=8),
        limits=LimitsConfig(**LAB_LIMITS),
    )


class ThreadedCoordinator:
    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.service = CoordinatorService(cfg, init=True)
        self.thread = threading.Thread(target=self.service.run, daemon=True)

    def __enter__(self) -> CoordinatorService:
        self.thread.start()
        return self.service

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(10)


def coordinator_toml(path: Path, broker: Broker, model: Path, **sections: object) -> Path:
    """A lab coordinator's TOML at ``path`` (its state in ``state/`` beside it), with extra ``sections``."""
    return write_toml(
        path,
        {
            "fleet": FLEET,
            "state_dir": "state",
            "heartbeat_s": 1.0,
            "broker": {"port": broker.port},
            "model": {"source": str(model), "lora_r": 4, "lora_alpha": 8},
            "limits": LAB_LIMITS,
            **sections,
        },
    )


@pytest.fixture
def coordinator_process(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> Iterator[Child]:
    """``fedge-coordinator serve`` as a child process (so that tests can kill -9 it)."""
    cfg = coordinator_toml(tmp_path / "coord" / "coordinator.toml", broker, tiny_model)
    child = Child("coordinator", serve_argv(cfg), tmp_path / "coord.log")
    yield child
    child.stop()


class DeviceClient:
    """A device-side MQTT v5 client that publishes real envelopes and follows the global meta."""

    def __init__(self, port: int, device: str = "probe") -> None:
        self.device = device
        self.metas: queue.Queue[GlobalMeta] = queue.Queue()
        self.snapshots: dict[str, bytes] = {}
        self.client = make_client(loopback(port), f"{device}-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe([(protocol.global_meta(FLEET), 1), (protocol.global_snapshot(FLEET), 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/meta"):
            self.metas.put(GlobalMeta.from_json(msg.payload))
        else:
            self.snapshots[hashlib.sha256(msg.payload).hexdigest()] = bytes(msg.payload)

    def wait_meta(self, min_version: int, timeout: float = 30.0) -> GlobalMeta:
        """The first meta at ``min_version`` or later; fails after ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no global meta with version >= {min_version} within {timeout:.0f}s")
            try:
                meta = self.metas.get(timeout=remaining)
            except queue.Empty:
                continue
            if meta.version >= min_version:
                return meta

    def global_state(self, meta: GlobalMeta) -> dict[str, np.ndarray]:
        return decode_frame(self.snapshots[meta.snapshot_sha256]).dense()

    def update_payload(self, base: GlobalMeta, scale: float = 0.01, uid: str | None = None, base_sha256: str = "") -> bytes:
        state = self.global_state(base)
        delta = {k: np.full_like(v, scale) for k, v in state.items()}
        frame = compress_update(delta, CodecConfig(topk_fraction=1.0, values="fp32")).frame
        self.seq += 1
        header = UpdateHeader(
            device=self.device,
            seq=self.seq,
            update_id=uid or f"{self.device}-{self.seq}-{uuid.uuid4().hex[:6]}",
            base_version=base.version,
            num_samples=4,
            timestamp=0.0,
            frame_sha256=hashlib.sha256(frame).hexdigest(),
            base_sha256=base_sha256,
        )
        return protocol.encode_envelope(header, frame)

    def publish(self, payload: bytes, device: str | None = None) -> None:
        info = self.client.publish(protocol.device_update(FLEET, device or self.device), payload, qos=1)
        info.wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device_client(broker: MosquittoBroker) -> Iterator[DeviceClient]:
    c = DeviceClient(broker.port)
    yield c
    c.close()


def agent_config_dict(broker: Broker, model: Path, data: Path, state: Path, device: str, **extra: object) -> dict:
    return {
        "device_id": device,
        "fleet": FLEET,
        "data_dir": str(data),
        "state_dir": str(state),
        "heartbeat_s": 1.0,
        "sync_wait_s": 5.0,
        "lab_mode": True,
        "broker": {"port": broker.port, "reconnect_min_s": 1.0, "reconnect_max_s": 2.0},
        "model": {"source": str(model), "quantize": "int8"},
        "train": {"threads": 1, "batch_size": 4, "seq_len": 32, "local_steps": 2, "lr": 1e-2, "eval_blocks": 4},
        **extra,
    }


def run_agent_to_end(cfg: Any, service: CoordinatorService, versions: int, timeout: float = 180.0) -> Any:
    """Run an agent (its config has ``max_rounds``) in a thread until it ends, then wait until the
    coordinator holds ``versions`` versions; returns the agent."""
    from edge_agent.agent import Agent
    from tests.conftest import wait_until

    agent = Agent(cfg)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the agent did not finish its rounds"
    wait_until(lambda: service.version >= versions, 30, f"{versions} versions")
    return agent


__all__ = [
    "DeviceClient",
    "ThreadedCoordinator",
    "agent_config_dict",
    "coordinator_config",
    "coordinator_toml",
    "replace",
    "run_agent_to_end",
]
