"""The agent as a service against a real Mosquitto: offline outbox, kill -9, sd_notify, check/status, privacy."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard

from compression import protocol
from compression.mqtt import loopback, make_client
from coordinator.store import Store
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.state import AgentState
from fedge_lab.broker import MosquittoBroker
from fedge_lab.demo import write_toml
from fedge_lab.processes import Child
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, ThreadedCoordinator, agent_config_dict, coordinator_config

pytestmark = pytest.mark.broker


@pytest.fixture
def persistent_broker(tmp_path: Path, mosquitto_binary: str) -> Iterator[MosquittoBroker]:
    """Mosquitto with persistence, as in production: sessions and queued messages survive a restart."""
    b = MosquittoBroker(tmp_path / "pbroker", persistence=True)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _ledger(coord_dir: Path, device: str) -> list[dict]:
    return [e for e in Store(coord_dir, readonly=True).ledger() if e["device"] == device]


def test_updates_made_offline_are_delivered_once_after_reconnect(
    tmp_path: Path, persistent_broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    broker = persistent_broker
    raw = agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-off", max_outbox=3, sync_wait_s=1.0)
    cfg = parse_config(raw, "test", environ={})
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        agent = Agent(cfg)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: service.version >= 1, 90, "a first version")
            broker.stop()
            wait_until(lambda: not agent.transport.connected.is_set(), 10, "the agent to notice the outage")
            # Training goes on offline until the outbox is full, then waits.
            wait_until(lambda: agent.pending_count >= 3, 90, "three updates in the outbox")
            time.sleep(2.0)
            assert agent.pending_count == 3, "training must stop while the outbox is full"
            made = agent.state.seq
            broker.start()
            wait_until(lambda: agent.pending_count == 0 and agent.transport.connected.is_set(), 60, "the outbox to drain")
            wait_until(lambda: {e["seq"] for e in _ledger(tmp_path / "coord", "pi-off")} >= set(range(1, made + 1)), 60, "every update")
        finally:
            agent.stop()
            thread.join(60)
    ledger = _ledger(tmp_path / "coord", "pi-off")
    seqs = [e["seq"] for e in ledger]
    assert len(seqs) == len(set(seqs)), f"an update was applied twice: {seqs}"
    assert set(range(1, made + 1)) <= set(seqs)
    assert agent.transport.reconnects >= 1


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def _drain(sock: socket.socket, into: list[str]) -> None:
    while True:
        try:
            into.extend(sock.recv(65536).decode().split("\n"))
        except TimeoutError:
            return


def test_service_shell_notifies_systemd_and_stops_cleanly_on_sigterm(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    cfg_path = write_toml(tmp_path / "agent.toml", agent_config_dict(broker, tiny_model, device_data(1), tmp_path / "state", "pi-svc"))
    sock = _notify_socket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    messages: list[str] = []
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        log = (tmp_path / "agent.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg_path)], stdout=log, stderr=log, env=env)
        try:

            def seen(prefix: str) -> bool:
                _drain(sock, messages)
                return any(m.startswith(prefix) for m in messages)

            wait_until(lambda: seen("READY=1"), 90, "READY=1")
            wait_until(lambda: service.version >= 1, 90, "an update from the agent")
            wait_until(lambda: seen("WATCHDOG=1"), 10, "watchdog pings")
            assert any(m.startswith("STATUS=") and "v" in m for m in messages)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
        _drain(sock, messages)
    assert "STOPPING=1" in messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")

    cmd = [sys.executable, "-m", "edge_agent", "status", "--config", str(cfg_path), "--json"]
    status = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["running"] is False and doc["state"] == "stopped" and doc["seq"] >= 1
    assert doc["metrics"]["rounds"] >= 1 and doc["model_cache"]
    assert doc["metrics"]["peak_rss_mb"] >= doc["metrics"]["rss_mb"] * 0.9 and doc["metrics"]["step_s"] > 0


def test_check_says_plainly_what_is_wrong(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    good = write_toml(tmp_path / "good.toml", agent_config_dict(broker, tiny_model, device_data(2), tmp_path / "state", "pi-chk"))
    ok = subprocess.run([sys.executable, "-m", "edge_agent", "check", "--config", str(good)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all checks passed" in ok.stdout and "ok    model:" in ok.stdout and "ok    broker:" in ok.stdout

    raw = agent_config_dict(broker, tiny_model, tmp_path / "no-such-dir", tmp_path / "state2", "pi-chk")
    raw["broker"]["port"] = broker.port + 1 if broker.port < 65535 else broker.port - 1
    bad = write_toml(tmp_path / "bad.toml", raw)
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check", "--config", str(bad), "--skip-model", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 4, out.stdout + out.stderr  # the first failure: the data directory
    assert "FAIL  local data:" in out.stdout and "no-such-dir" in out.stdout
    assert "FAIL  broker:" in out.stdout

    # A schedule that blocks training now is no failure, but check says so, and why.
    import datetime as dt

    hour = (dt.datetime.now().hour + 2) % 24
    raw = agent_config_dict(broker, tiny_model, device_data(2), tmp_path / "state3", "pi-chk")
    raw["schedule"] = {"window": f"{hour:02d}:00-{(hour + 1) % 24:02d}:00"}
    closed = write_toml(tmp_path / "closed.toml", raw)
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check", "--config", str(closed), "--skip-model"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"WAITS schedule: training would wait now: outside the training window {hour:02d}:00" in out.stdout, out.stdout
    assert "all checks passed, but training waits (schedule:" in out.stdout


def test_agent_survives_repeated_kill_9(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    raw = agent_config_dict(broker, tiny_model, device_data(3), tmp_path / "state", "pi-kill", sync_wait_s=0.5)
    cfg_path = write_toml(tmp_path / "agent.toml", raw)
    rng = random.Random(11)
    cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg_path)]
    seqs_at_start: list[int] = []
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        child = Child("agent", cmd, tmp_path / "agent.log")
        child.start()
        wait_until(lambda: service.version >= 1, 120, "a first update")  # the int8 cache exists from here on
        for _ in range(8):
            time.sleep(rng.uniform(0.2, 4.0))  # loading, training, compressing, committing or publishing
            os.kill(child.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            child.proc.wait(10)  # type: ignore[union-attr]
            state = AgentState(tmp_path / "state")  # recovers exactly as the next start will
            assert all(np.all(np.isfinite(v)) for v in state.load_feedback().residual.values())
            seqs_at_start.append(state.seq)
            child.start()
        before = service.version
        wait_until(lambda: service.version >= before + 2, 120, "updates after the last restart")
        child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert child.proc.wait(60) == 0  # type: ignore[union-attr]
        wait_until(lambda: not AgentState(tmp_path / "state").pending(), 30, "the outbox to drain")
    assert seqs_at_start == sorted(seqs_at_start)
    assert not list((tmp_path / "state").rglob("*.tmp"))
    ledger = _ledger(tmp_path / "coord", "pi-kill")
    seqs = [e["seq"] for e in ledger]
    assert len(seqs) == len(set(seqs)), f"an update was applied twice: {seqs}"
    versions = [e["applied_version"] for e in ledger]
    assert versions == sorted(versions)


def test_no_raw_text_ever_leaves_the_device(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    data_dir = device_data(4)
    text = "\n".join(p.read_text() for p in sorted(data_dir.rglob("*")) if p.is_file())
    window = 24
    shingles = {text[i : i + window].encode() for i in range(0, len(text) - window) if text[i : i + window].strip()}
    payloads: list[tuple[str, bytes]] = []
    spy = make_client(loopback(broker.port), "spy")
    spy.on_connect = lambda c, u, f, r, p: c.subscribe("#", qos=1)
    spy.on_message = lambda c, u, m: payloads.append((m.topic, bytes(m.payload)))
    spy.connect("127.0.0.1", broker.port)
    spy.loop_start()
    cfg = parse_config(agent_config_dict(broker, tiny_model, data_dir, tmp_path / "agent", "pi-priv", max_rounds=2), "test", environ={})
    try:
        with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)):
            agent = Agent(cfg)
            thread = threading.Thread(target=agent.run, daemon=True)
            thread.start()
            thread.join(180)
            assert not thread.is_alive()
            time.sleep(0.5)
    finally:
        spy.disconnect()
        spy.loop_stop()
    mine = [(t, p) for t, p in payloads if "/devices/pi-priv/" in t]
    assert any(t.endswith("/update") for t, _ in mine) and any(t.endswith("/status") for t, _ in mine)
    for topic, payload in mine:
        views = [payload]
        if topic == protocol.device_update(FLEET, "pi-priv"):
            _, frame = protocol.decode_envelope(payload)
            views.append(zstandard.ZstdDecompressor().decompress(frame[16:-4]))  # the frame body, uncompressed
        for view in views:
            for i in range(0, max(len(view) - window, 0) + 1):
                assert view[i : i + window] not in shingles, f"raw text in a message on {topic}"
