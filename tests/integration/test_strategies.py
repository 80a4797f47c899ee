"""FedBuff, FedAvg rounds, rate limits and the device list, in the running coordinator against Mosquitto."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.store import Store
from coordinator.strategy import StrategyConfig
from fedge_lab.broker import MosquittoBroker, free_port
from fedge_lab.demo import serve_argv
from fedge_lab.processes import Child
from tests.conftest import wait_until
from tests.integration.conftest import DeviceClient, ThreadedCoordinator, coordinator_config, coordinator_toml

pytestmark = pytest.mark.broker


def _rejections(coord: Path) -> dict[str, int]:
    return Store(coord, readonly=True).rejection_counts()


def test_fedbuff_makes_one_version_per_k_updates_weighted_by_samples(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedbuff", buffer_size=3, staleness="constant", server_lr=1.0))
    a, b = DeviceClient(broker.port, "dev-a"), DeviceClient(broker.port, "dev-b")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta = a.wait_meta(0)
            v0 = a.global_state(meta)
            a.publish(a.update_payload(meta, scale=0.01))
            b.publish(b.update_payload(b.wait_meta(0), scale=0.04))
            wait_until(lambda: len(service.buffer) == 2, 10, "two buffered updates")
            assert service.version == 0
            a.publish(a.update_payload(meta, scale=0.01))
            a.wait_meta(1)
            residual = service.downlink.residual
            v1 = service.state
    finally:
        a.close()
        b.close()
    # Every update has 4 samples: the step is the mean delta, (0.01 + 0.04 + 0.01) / 3 = 0.02.
    # What the sparse downlink did not send yet waits in the coordinator's residual.
    for name in v0:
        np.testing.assert_allclose(v1[name] - v0[name] + residual[name], 0.02, rtol=1e-4)
    ledger = list(Store(tmp_path / "coord", readonly=True).ledger())
    assert [e["applied_version"] for e in ledger] == [1, 1, 1]
    assert sorted(e["device"] for e in ledger) == ["dev-a", "dev-a", "dev-b"]


def test_a_buffered_update_survives_kill_9(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_client: DeviceClient) -> None:
    cfg_path = coordinator_toml(tmp_path / "coordinator.toml", broker, tiny_model, strategy={"kind": "fedbuff", "buffer_size": 2})
    child = Child("coordinator", serve_argv(cfg_path), tmp_path / "coord.log")
    child.start()
    try:
        meta = device_client.wait_meta(0)
        device_client.publish(device_client.update_payload(meta))
        wait_until(lambda: len(Store(tmp_path / "state", readonly=True).buffered()) == 1, 15, "the update in the durable buffer")
        os.kill(child.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        child.proc.wait(10)  # type: ignore[union-attr]
        child.start()
        device_client.publish(device_client.update_payload(meta))
        assert device_client.wait_meta(1).version == 1
    finally:
        child.stop()
    ledger = list(Store(tmp_path / "state", readonly=True).ledger())
    assert len(ledger) == 2 and {e["applied_version"] for e in ledger} == {1}


def test_fedavg_round_waits_for_its_participants_and_takes_a_straggler_into_the_next(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedavg", round_participants=2, min_participants=2, round_deadline_s=60))
    a, b = DeviceClient(broker.port, "dev-a"), DeviceClient(broker.port, "dev-b")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta0 = a.wait_meta(0)
            late = b.update_payload(b.wait_meta(0))
            a.publish(a.update_payload(meta0))
            time.sleep(1.0)
            assert service.version == 0  # one of two participants
            a.publish(a.update_payload(meta0))  # a second update of the same device in the same round
            wait_until(lambda: _rejections(tmp_path / "coord").get("one_per_round") == 1, 10, "one_per_round")
            b.publish(b.update_payload(meta0))
            meta1 = a.wait_meta(1)
            b.publish(late)  # trained on version 0, arrives in round 2: it joins it, weighted by s(1)
            a.publish(a.update_payload(meta1))
            a.wait_meta(2)
            stale = b.update_payload(meta0)  # two rounds late: beyond round_late = 1
            b.publish(stale)
            wait_until(lambda: _rejections(tmp_path / "coord").get("too_stale") == 1, 10, "the two-rounds-late update's rejection")
            assert service.version == 2
    finally:
        a.close()
        b.close()
    ledger = list(Store(tmp_path / "coord", readonly=True).ledger())
    rounds = {v: sorted((e["device"], e["staleness"]) for e in ledger if e["applied_version"] == v) for v in (1, 2)}
    assert rounds == {1: [("dev-a", 0), ("dev-b", 0)], 2: [("dev-a", 0), ("dev-b", 1)]}


def test_fedavg_round_closes_at_the_deadline_with_the_minimum(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedavg", round_participants=5, min_participants=1, round_deadline_s=1.5))
    a = DeviceClient(broker.port, "dev-a")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta0 = a.wait_meta(0)
            a.publish(a.update_payload(meta0))
            t0 = time.monotonic()
            a.wait_meta(1)
            assert time.monotonic() - t0 >= 1.0 and service.version == 1
    finally:
        a.close()


def test_rate_limit_and_device_list(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    limits = replace(cfg.limits, allow_unknown_devices=False, devices=("dev-a",), max_updates_per_minute=1.0, rate_burst=1)
    cfg = replace(cfg, limits=limits, metrics_port=free_port())
    a, intruder = DeviceClient(broker.port, "dev-a"), DeviceClient(broker.port, "intruder")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta = a.wait_meta(0)
            a.publish(a.update_payload(meta))
            a.publish(a.update_payload(meta))  # within the same minute
            intruder.publish(intruder.update_payload(intruder.wait_meta(0)))
            wait_until(lambda: sum(_rejections(tmp_path / "coord").values()) == 2, 10, "two rejections")
            assert _rejections(tmp_path / "coord") == {"rate_limited": 1, "unknown_device": 1}
            assert service.version == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
    finally:
        a.close()
        intruder.close()
    assert 'fedge_updates_rejected_total{fleet="test",reason="rate_limited"} 1.0' in text
    assert 'fedge_updates_rejected_total{fleet="test",reason="unknown_device"} 1.0' in text
    assert 'fedge_global_version{fleet="test"} 1.0' in text
    assert 'fedge_updates_applied_total{fleet="test"} 1.0' in text
    assert 'fedge_update_staleness_bucket{fleet="test",le="0.0"} 1.0' in text
    assert "fedge_ingest_latency_seconds_count" in text


def test_dp_fedbuff_one_update_per_device_per_buffer_and_the_budget(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    import json
    import subprocess

    from coordinator.privacy import DPConfig, epsilon

    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    dp = DPConfig(enabled=True, clip=0.5, noise_multiplier=1.0, epsilon_budget=epsilon(2, 1.0, 1e-5, "rdp") + 0.01, seed=0)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedbuff", buffer_size=2, staleness="constant"), dp=dp)
    a, b = DeviceClient(broker.port, "dev-a"), DeviceClient(broker.port, "dev-b")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta = a.wait_meta(0)
            a.publish(a.update_payload(meta))
            a.publish(a.update_payload(meta))  # a second one in the same buffer
            wait_until(lambda: _rejections(tmp_path / "coord").get("one_per_buffer") == 1, 10, "one_per_buffer")
            b.publish(b.update_payload(b.wait_meta(0)))
            meta1 = a.wait_meta(1)
            # A second buffer: both devices reach 2 participations.
            a.publish(a.update_payload(meta1))
            b.publish(b.update_payload(meta1))
            wait_until(lambda: service.version >= 2, 30, "version 2")
            assert service.participations == {"dev-a": 2, "dev-b": 2}
            a.publish(a.update_payload(a.wait_meta(2)))  # a third would exceed the budget
            wait_until(lambda: _rejections(tmp_path / "coord").get("privacy_budget") == 1, 10, "privacy_budget")
    finally:
        a.close()
        b.close()
    out = subprocess.run(
        [sys.executable, "-m", "coordinator", "devices", "--state-dir", str(tmp_path / "coord"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = {r["device"]: r for r in json.loads(out.stdout)}
    assert rows["dev-a"]["dp_participations"] == 2
    assert rows["dev-a"]["dp_epsilon"] == pytest.approx(epsilon(2, 1.0, 1e-5), rel=1e-6)  # PLD in the CLI
    cmd = [sys.executable, "-m", "coordinator", "status", "--state-dir", str(tmp_path / "coord"), "--json"]
    status = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout)
    assert status["dp"]["max_participations"] == 2 and status["dp"]["epsilon_max"] == pytest.approx(rows["dev-a"]["dp_epsilon"])
