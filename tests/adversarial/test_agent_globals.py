"""Agents against hostile global state: forged or unsigned versions, bombs, and a validly signed
spec the device cannot train. The agent refuses them, reports why, and stays up."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compression import FrameKind, compress_dense, protocol, state_digest
from compression.protocol import GlobalMeta
from coordinator.config import ModelSpecConfig
from coordinator.identity import fleet_key, public_hex
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker
from tests.adversarial.conftest import RawClient
from tests.adversarial.test_attacks import _bomb_411
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, ThreadedCoordinator, agent_config_dict, coordinator_config

pytestmark = pytest.mark.broker


def _agent(broker: MosquittoBroker, tiny_model: Path, data: Path, state: Path, fleet_public: str, **extra: object) -> Agent:
    raw = agent_config_dict(broker, tiny_model, data, state, "pi-victim", **extra)
    raw.pop("lab_mode")
    raw["fleet_public_key"] = fleet_public
    return Agent(parse_config(raw, "test", environ={}))


def _forged_version(state: dict[str, np.ndarray], version: int, key: Ed25519PrivateKey | None) -> tuple[bytes, bytes]:
    """A self-consistent meta and snapshot (the sha256s and the digest all match), unsigned or signed by ``key``."""
    fake = {k: np.full_like(v, 7.0) for k, v in state.items()}
    snap = compress_dense(fake, FrameKind.SNAPSHOT)
    meta = GlobalMeta(version, hashlib.sha256(snap).hexdigest(), len(snap), time.time(), state_digest(fake), model={"tier": "lora"})
    return (meta.signed(key.sign) if key else meta).to_json(), snap


def test_forged_and_unsigned_global_state_is_refused(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        agent = _agent(broker, tiny_model, device_data(0), tmp_path / "agent", public_hex(fleet_key(tmp_path / "coord", create=False)))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: service.version >= 1, 120, "the agent's first update")
            attacker = RawClient(broker.port, None, None, "attacker")
            state = agent.global_model.tensors  # type: ignore[union-attr]
            for key in (None, Ed25519PrivateKey.generate()):
                meta, snap = _forged_version(state, 104, key)
                attacker.publish(protocol.global_snapshot(FLEET), snap, retain=True)
                attacker.publish(protocol.global_meta(FLEET), meta, retain=True)
            attacker.publish(protocol.global_delta(FLEET), _bomb_411(), retain=True)
            attacker.publish(protocol.device_ack(FLEET, "pi-victim"), b'{"outcome": "applied"}', retain=True)
            attacker.close()
            # Barrier: versions the real coordinator makes after the forgeries reach the agent.
            before = service.version
            wait_until(lambda: service.version >= before + 2, 120, "two more real versions")
            wait_until(
                lambda: agent.global_model is not None and agent.global_model.version >= before + 1, 60, "the agent on a real version"
            )
            assert agent.refused_messages >= 3
            assert thread.is_alive()
        finally:
            agent.stop()
            thread.join(60)
    assert "future_version" not in service.rejections and service.rejections == {}


def test_a_signed_spec_the_device_cannot_train_is_refused_without_exiting(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, model=ModelSpecConfig(source=str(tiny_model), lora_r=32, lora_alpha=64))
    with ThreadedCoordinator(cfg):
        agent = _agent(
            broker,
            tiny_model,
            device_data(0),
            tmp_path / "agent",
            public_hex(fleet_key(tmp_path / "coord", create=False)),
            train={"max_lora_r": 8},
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: agent._refused_reason, 120, "the refusal")
            time.sleep(1.0)
            assert thread.is_alive() and agent.global_model is None
            status = protocol.DeviceStatus.from_json(agent._status("waiting"))
            assert "rank 32" in (status.detail or "")
        finally:
            agent.stop()
            thread.join(60)
    assert not thread.is_alive()
