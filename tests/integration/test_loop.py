"""The federated loop against a real Mosquitto: agents, coordinator, restarts, bad input."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from compression import state_digest
from coordinator.store import Store
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker
from fedge_lab.processes import Child
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, DeviceClient, ThreadedCoordinator, agent_config_dict, coordinator_config

pytestmark = pytest.mark.broker


def _run_agent(agent: Agent) -> threading.Thread:
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


def test_agent_round_trip_produces_a_new_global_version(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config(agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-1", max_rounds=2), "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        agent = Agent(cfg)
        thread = _run_agent(agent)
        thread.join(120)
        assert not thread.is_alive()
        wait_until(lambda: service.version >= 2, 30, "two versions")
        assert agent.global_model is not None and agent.global_model.version >= 1
        assert agent.counters.updates_sent == 2 and not agent.state.pending()
        # The agent followed the compressed global deltas and holds exactly the coordinator's state.
        wait_until(lambda: agent.global_model.version == service.version, 10, "the agent to hold the last version")  # type: ignore[union-attr]
        assert state_digest(agent.global_model.tensors) == state_digest(service.state)
        assert agent.counters.bytes_down_delta > 0
    store = Store(tmp_path / "coord", create=True)
    ledger = list(store.ledger())
    assert [e["device"] for e in ledger] == ["pi-1", "pi-1"]
    assert [e["applied_version"] for e in ledger] == [1, 2]
    (dev,) = store.devices()
    assert dev["device"] == "pi-1" and dev["accepted"] == 2 and dev["state"] == "offline"


def test_agent_reconnects_after_the_broker_restarts(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config(agent_config_dict(broker, tiny_model, device_data(1), tmp_path / "agent", "pi-2"), "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        agent = Agent(cfg)
        thread = _run_agent(agent)
        try:
            wait_until(lambda: service.version >= 1, 60, "a first version")
            broker.stop()
            wait_until(lambda: not agent.transport.connected.is_set(), 10, "the agent to notice the outage")
            before = service.version
            broker.start()
            wait_until(lambda: agent.transport.connected.is_set(), 30, "the agent to reconnect")
            wait_until(lambda: service.version >= before + 2, 60, "updates after the restart")
        finally:
            agent.stop()
            thread.join(30)
    assert not thread.is_alive()


def test_coordinator_restarts_from_its_last_version(tmp_path: Path, coordinator_process: Child, device_client: DeviceClient) -> None:
    coordinator_process.start()
    meta = device_client.wait_meta(0)
    for _ in range(3):
        device_client.publish(device_client.update_payload(meta))
        meta = device_client.wait_meta(meta.version + 1)
    assert meta.version == 3
    state_before = device_client.global_state(meta)
    os.kill(coordinator_process.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    coordinator_process.proc.wait(10)  # type: ignore[union-attr]

    restarted_at = time.monotonic()
    coordinator_process.start()
    republished = device_client.wait_meta(3)  # republished on start
    assert republished.version == 3 and time.monotonic() - restarted_at < 15
    for name, arr in device_client.global_state(republished).items():
        assert (arr == state_before[name]).all()
    device_client.publish(device_client.update_payload(republished))
    assert device_client.wait_meta(4).version == 4


def test_malformed_updates_are_rejected_with_a_reason_and_the_coordinator_stays_up(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_client: DeviceClient
) -> None:
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        meta = device_client.wait_meta(0)
        good = device_client.update_payload(meta)
        corrupted = bytearray(good)
        corrupted[-10] ^= 0xFF
        device_client.publish(b"not an envelope")
        device_client.publish(bytes(corrupted))
        device_client.publish(good, device="someone-else")  # the envelope says 'probe'
        device_client.publish(good)
        device_client.publish(good)  # QoS 1 redelivery of the same update id: applied once
        assert device_client.wait_meta(1).version == 1
        store = Store(tmp_path / "coord", readonly=True)
        wait_until(lambda: sum(store.rejection_counts().values()) >= 3, 10, "three rejections")
        time.sleep(0.5)  # let the duplicate arrive; it must not make version 2
        assert service.version == 1
        assert store.rejection_counts() == {"malformed_message": 2, "device_mismatch": 1}
        retained = device_client.global_state(meta)
        assert set(retained) == set(service.state)


def test_last_will_marks_a_killed_agent_offline(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    import sys

    from coordinator.monitor import FleetMonitor
    from fedge_lab.demo import write_toml

    cfg = write_toml(tmp_path / "agent.toml", agent_config_dict(broker, tiny_model, device_data(2), tmp_path / "state", "pi-3"))
    monitor = FleetMonitor("127.0.0.1", broker.port, FLEET)
    agent = Child("agent", [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)], tmp_path / "agent.log").start()
    try:
        # No coordinator: the agent connects and waits for a global version.
        wait_until(lambda: (s := monitor.poll().devices.get("pi-3")) is not None and s.state == "waiting", 60, "the agent's status")
        os.kill(agent.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        wait_until(lambda: monitor.poll().devices["pi-3"].state == "offline", 10, "the Last Will")
    finally:
        agent.stop()
        monitor.close()


def test_a_late_joiner_takes_the_snapshot_then_follows_deltas(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data, device_client: DeviceClient
) -> None:  # type: ignore[no-untyped-def]
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        meta = device_client.wait_meta(0)
        for _ in range(3):
            device_client.publish(device_client.update_payload(meta))
            meta = device_client.wait_meta(meta.version + 1)
        cfg = parse_config(agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "late", max_rounds=2), "t", environ={})
        agent = Agent(cfg)
        thread = _run_agent(agent)
        thread.join(120)
        assert not thread.is_alive()
        assert agent.global_model is not None and agent.global_model.version == service.version == 5
        assert state_digest(agent.global_model.tensors) == state_digest(service.state)
        assert agent.counters.bytes_down_snapshot > 0 and agent.counters.bytes_down_delta > 0
        assert not agent.transport.following_snapshot  # back to deltas only once in sync


def test_the_amqtt_demo_broker_carries_the_loop_over_mqtt_3_1_1(tmp_path: Path, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("amqtt")
    from dataclasses import replace

    from fedge_lab.broker import AmqttBroker

    with AmqttBroker(tmp_path / "amqtt") as amqtt:
        cfg = coordinator_config(amqtt, tmp_path / "coord", tiny_model)
        cfg = replace(cfg, broker=replace(cfg.broker, protocol="3.1.1"))
        agent_cfg = agent_config_dict(amqtt, tiny_model, device_data(0), tmp_path / "agent", "pi-amqtt", max_rounds=1)
        agent_cfg["broker"]["protocol"] = "3.1.1"
        with ThreadedCoordinator(cfg) as service:
            agent = Agent(parse_config(agent_cfg, "t", environ={}))
            thread = _run_agent(agent)
            thread.join(120)
            assert not thread.is_alive()
            wait_until(lambda: service.version >= 1, 30, "a version over amqtt")
        assert agent.counters.updates_sent == 1


def test_a_mixed_fleet_of_lora_and_embedding_devices_trains_one_model(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from compression.protocol import EMBED_DELTA

    coord = coordinator_config(broker, tmp_path / "coord", tiny_model)
    coord = replace(coord, model=replace(coord.model, embedding=True))
    agents = []
    for i, tier in enumerate(("lora", "embedding")):
        raw = agent_config_dict(broker, tiny_model, device_data(i), tmp_path / f"agent{i}", f"mix-{tier}", max_rounds=2)
        raw["train"]["tier"] = tier
        agents.append(Agent(parse_config(raw, "test", environ={})))
    with ThreadedCoordinator(coord) as service:
        threads = [_run_agent(a) for a in agents]
        for t in threads:
            t.join(180)
            assert not t.is_alive()
        wait_until(lambda: service.version >= 4, 30, "four versions")
        table = service.state[EMBED_DELTA]
        assert np.count_nonzero(np.abs(table).sum(axis=1)) > 0  # embedding rows moved
        assert np.count_nonzero(np.abs(table).sum(axis=1)) < table.shape[0]  # ... only some of them
    store = Store(tmp_path / "coord", readonly=True)
    for a in agents:
        # Each agent stopped after its own rounds; what it held is exactly the coordinator's version.
        assert a.global_model is not None and a.global_model.version >= 1
        held, _ = store.load_version(a.global_model.version)
        assert state_digest(a.global_model.tensors) == state_digest(held)
    ledger = list(store.ledger())
    assert sorted({e["device"] for e in ledger}) == ["mix-embedding", "mix-lora"]


def test_the_agent_scores_every_nth_version_it_adopts_and_names_the_version_scored(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    raw = agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-ev", max_rounds=4)
    raw.setdefault("train", {}).update(eval_every=2, eval_when_idle=False)
    cfg = parse_config(raw, "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)):
        agent = Agent(cfg)
        adopted: list[int] = []
        scored: list[int] = []
        after_adopt, score = agent._after_adopt, agent._score

        def spy_adopt() -> None:
            adopted.append(agent.global_model.version)  # type: ignore[union-attr]
            after_adopt()

        def spy_score() -> None:
            scored.append(agent.global_model.version)  # type: ignore[union-attr]
            score()

        agent._after_adopt = spy_adopt  # type: ignore[method-assign]
        agent._score = spy_score  # type: ignore[method-assign]
        thread = _run_agent(agent)
        thread.join(120)
        assert not thread.is_alive()
    assert len(adopted) >= 3
    assert scored == adopted[::2]  # the first version adopted, then every 2nd
    assert agent.counters.extra["eval_version"] == scored[-1] and agent.counters.eval_loss is not None
