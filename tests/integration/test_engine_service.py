"""The engine behind the running coordinator, against Mosquitto: the ledger's weights, a user
strategy loaded from config, FedAdam's state across kill -9, and FedAvg rounds of devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.robust import RobustConfig
from coordinator.store import Store
from coordinator.strategy import StrategyConfig
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker
from fedge_lab.demo import serve_argv
from fedge_lab.processes import Child
from tests.conftest import wait_until
from tests.integration.conftest import DeviceClient, ThreadedCoordinator, agent_config_dict, coordinator_config, coordinator_toml

pytestmark = pytest.mark.broker


def _history(state: Path) -> dict:
    argv = [sys.executable, "-m", "coordinator", "history", "--state-dir", str(state), "--json", "--last", "0"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_history_shows_weight_zero_for_the_update_multi_krum_dropped(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    robust = RobustConfig(rule="multi_krum", krum_f=1)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedbuff", buffer_size=5, staleness="constant", robust=robust))
    clients = [DeviceClient(broker.port, f"dev-{i}") for i in range(4)] + [DeviceClient(broker.port, "evil")]
    try:
        with ThreadedCoordinator(cfg):
            metas = [c.wait_meta(0) for c in clients]
            for i, (c, meta) in enumerate(zip(clients, metas, strict=True)):
                c.publish(c.update_payload(meta, scale=-0.2 if c.device == "evil" else 0.01 + 0.0001 * i))
            clients[0].wait_meta(1)
    finally:
        for c in clients:
            c.close()
    (v1,) = [v for v in _history(tmp_path / "coord")["versions"] if v["version"] == 1]
    weights = {u["device"]: u["weight"] for u in v1["updates"]}
    assert weights["evil"] == 0.0
    assert all(w == pytest.approx(0.25) for d, w in weights.items() if d != "evil")


def _coordinator(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, strategy: dict) -> Child:
    lossless = {"topk_fraction": 1.0, "values": "fp32"}
    cfg = coordinator_toml(tmp_path / "coordinator.toml", broker, tiny_model, downlink=lossless, strategy=strategy)
    return Child("coordinator", serve_argv(cfg), tmp_path / "coord.log").start()


def test_a_user_strategy_from_config_runs_end_to_end(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    strategy = {"kind": "tests.integration.user_strategy:Scaled", "options": {"factor": 0.5, "every": 2}}
    child = _coordinator(tmp_path, broker, tiny_model, strategy)
    a, b = DeviceClient(broker.port, "dev-a"), DeviceClient(broker.port, "dev-b")
    try:
        meta = a.wait_meta(0)
        v0 = a.global_state(meta)
        a.publish(a.update_payload(meta, scale=0.02))
        b.publish(b.update_payload(b.wait_meta(0), scale=0.06))
        v1 = a.global_state(a.wait_meta(1))
    finally:
        a.close()
        b.close()
        child.stop()
    for name in v0:  # 0.5 * mean(0.02, 0.06): the user's rule, through a lossless downlink
        np.testing.assert_allclose(v1[name] - v0[name], 0.02, rtol=1e-5)
    (entry,) = [v for v in _history(tmp_path / "state")["versions"] if v["version"] == 1]
    assert [u["weight"] for u in entry["updates"]] == [0.25, 0.25]
    _, _, strategy_state = Store(tmp_path / "state", readonly=True).load_version_full(1)
    assert strategy_state["made"].tolist() == [1.0]


def test_a_failing_user_strategy_refuses_the_update_and_the_coordinator_stays_up(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, strategy=StrategyConfig(kind="tests.integration.user_strategy:Broken"))
    dev = DeviceClient(broker.port, "dev-a")
    try:
        with ThreadedCoordinator(cfg) as service:
            meta = dev.wait_meta(0)
            dev.publish(dev.update_payload(meta))
            wait_until(lambda: service.rejections.get("handler_error") == 1, 15, "the update refused as handler_error")
            dev.publish(dev.update_payload(meta))
            wait_until(lambda: service.rejections.get("handler_error") == 2, 15, "the next one too: the service is up")
            assert service.version == 0 and list((tmp_path / "coord" / "quarantine").glob("*.bin"))
    finally:
        dev.close()


def test_fedadam_state_survives_kill_9(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    child = _coordinator(tmp_path, broker, tiny_model, {"kind": "fedadam", "buffer_size": 1, "optimizer": {"lr": 0.001}})
    dev = DeviceClient(broker.port, "dev-a")
    state = tmp_path / "state"
    scales = [0.01, -0.03, 0.02, 0.05]
    try:
        for i, scale in enumerate(scales):
            meta = dev.wait_meta(i, timeout=60)
            dev.publish(dev.update_payload(meta, scale=scale))
            dev.wait_meta(i + 1, timeout=60)
            os.kill(child.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            child.proc.wait(10)  # type: ignore[union-attr]
            child.start()
    finally:
        dev.close()
        child.stop()
    store = Store(state, readonly=True)
    assert store.current_version() == len(scales)
    # The moments after every version are exactly those of one uninterrupted run over the same updates.
    m = v = np.zeros(1)
    for version, g in enumerate(scales, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        _, _, s = store.load_version_full(version)
        assert int(s["t"][0]) == version
        name = next(k[2:] for k in s if k.startswith("m/"))
        np.testing.assert_allclose(s[f"m/{name}"], m[0], rtol=1e-5)
        np.testing.assert_allclose(s[f"v/{name}"], v[0], rtol=1e-5)


def test_fedavg_rounds_hold_one_update_per_device_and_the_slow_device_lands(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    coord = coordinator_config(broker, tmp_path / "coord", tiny_model)
    coord = replace(coord, strategy=StrategyConfig(kind="fedavg", min_participants=2, round_deadline_s=120.0))
    agents = []
    for i, name in enumerate(("fast-a", "fast-b", "slow")):
        raw = agent_config_dict(broker, tiny_model, device_data(i), tmp_path / name, name, max_rounds=4, sync_wait_s=0.5)
        if name == "slow":
            raw["train"]["slowdown"] = 10.0
            raw["train"]["sample_weight"] = "dataset"  # weighted by its training blocks, not steps x batch
        agents.append(Agent(parse_config(raw, "test", environ={})))
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    # The round's target is the devices online when it opens: all three, once their statuses are in.
    wait_until(lambda: all(a.transport.connected.is_set() and a._state_name == "waiting" for a in agents), 120, "three agents online")
    with ThreadedCoordinator(coord) as service:
        wait_until(lambda: service.presence.count == 3, 30, "the coordinator to see three devices online")
        wait_until(lambda: service.version >= 2, 240, "two rounds")
        for a in agents:
            a.stop()
        for t in threads:
            t.join(60)
    store = Store(tmp_path / "coord", readonly=True)
    ledger = list(store.ledger())
    by_version: dict[int, list[str]] = {}
    for e in ledger:
        by_version.setdefault(e["applied_version"], []).append(e["device"])
    for version, devices in by_version.items():
        assert len(devices) == len(set(devices)), f"v{version} holds two updates of one device: {devices}"
    assert "slow" in {d for v in (1, 2) for d in by_version.get(v, [])}, by_version
    slow = next(a for a in agents if a.cfg.device_id == "slow")
    assert slow._data is not None
    # Weighted by its dataset size, capped at limits.sample_factor (4) x the others' 2 steps x batch 4.
    allowed = {len(slow._data.train), min(len(slow._data.train), 4 * 2 * 4)}
    assert {e["num_samples"] for e in ledger if e["device"] == "slow"} <= allowed
    rejections = store.rejection_counts()
    assert rejections.get("too_stale", 0) == 0, rejections  # no device's work was wasted as stale


def test_updates_queued_while_the_coordinator_was_down_make_versions_published_as_one(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    """Updates that wait in the coordinator's session arrive as one batch: its versions each keep
    their ledger rows, one delta from the last published version goes out, and a device that
    follows the published deltas holds exactly the coordinator's state."""
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedbuff", buffer_size=2, staleness="constant", max_staleness=100))
    clients = [DeviceClient(broker.port, f"dev-{i}") for i in range(8)]
    try:
        with ThreadedCoordinator(cfg):
            metas = [c.wait_meta(0) for c in clients]
        payloads = [c.update_payload(m, scale=0.01 * (i + 1)) for i, (c, m) in enumerate(zip(clients, metas, strict=True))]
        for c, p in zip(clients, payloads, strict=True):
            c.publish(p)  # queued in the stopped coordinator's persistent session
        with ThreadedCoordinator(replace(cfg)) as svc:
            meta = clients[0].wait_meta(4)
            wait_until(lambda: svc.version == 4, 30, "version 4")
            state = dict(svc.state)
    finally:
        for c in clients:
            c.close()
    store = Store(tmp_path / "coord", readonly=True)
    try:
        rows = {r["version"]: r["sha256"] for r in store.db.execute("SELECT version, sha256 FROM versions")}
        applied = sorted(e["applied_version"] for e in store.ledger())
        base, delta = store.delta_frame(4)  # type: ignore[misc]
        base_state, _ = store.load_version(base)
    finally:
        store.close()
    assert applied == [1, 1, 2, 2, 3, 3, 4, 4]
    assert "" in rows.values() and rows[4] != ""  # at least two versions went out as one
    assert meta.version == 4 and meta.delta_base_version == base and rows[base] != ""
    # A device at the version the last delta applies to follows it to the coordinator's exact state.
    from compression import apply_delta, decode_frame, state_digest

    assert meta.state_sha256 == state_digest(state) == state_digest(apply_delta(base_state, decode_frame(delta).dense()))
