"""The base checked by content: a device with a same-shaped but different base is refused, and
so is an update declared against another base (real Mosquitto, tiny models)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from compression.basehash import base_sha256
from coordinator.store import Store
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.tiny import build_tiny_model
from fedge_lab.broker import MosquittoBroker
from fedge_lab.corpus import pydoc_domains
from tests.conftest import wait_until
from tests.integration.conftest import DeviceClient, ThreadedCoordinator, agent_config_dict, coordinator_config

pytestmark = pytest.mark.broker


def _twin(tmp_path: Path) -> Path:
    """A tiny model of the fixture's shape and tokenizer, with other weights (another seed)."""
    texts = [t for topics in pydoc_domains().values() for t in list(topics.values())[:8]]
    return build_tiny_model(tmp_path / "twin", texts, seed=1)


def test_a_device_with_a_same_shaped_but_different_base_is_refused(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    twin = _twin(tmp_path)
    assert json.loads((twin / "config.json").read_text()) == json.loads((tiny_model / "config.json").read_text())
    fleet_hash, twin_hash = base_sha256(tiny_model), base_sha256(twin)
    assert fleet_hash and twin_hash and fleet_hash != twin_hash
    cfg = parse_config(agent_config_dict(broker, twin, device_data(0), tmp_path / "agent", "pi-twin", max_rounds=1), "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        assert service.spec.base_sha256 == fleet_hash
        agent = Agent(cfg)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: agent._refused_reason, 60, "the agent to refuse the fleet's version")
            reason = str(agent._refused_reason)
            assert fleet_hash in reason and twin_hash in reason, reason
            time.sleep(1.0)
            assert agent.global_model is None and agent.counters.updates_sent == 0 and service.version == 0
        finally:
            agent.stop()
            thread.join(30)


def test_the_coordinator_refuses_an_update_declared_against_another_base(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_client: DeviceClient
) -> None:
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        meta = device_client.wait_meta(0)
        device_client.publish(device_client.update_payload(meta, base_sha256="ab" * 32))
        wait_until(lambda: service.outcomes.rejections.get("wrong_base"), 10, "the wrong base refused")
        assert service.version == 0
        device_client.publish(device_client.update_payload(meta, base_sha256=service.spec.base_sha256))
        v1 = device_client.wait_meta(1)
        assert v1.version == 1
        device_client.publish(device_client.update_payload(v1))  # a device that declares none
        assert device_client.wait_meta(2).version == 2
    assert Store(tmp_path / "coord", readonly=True).rejection_counts() == {"wrong_base": 1}
