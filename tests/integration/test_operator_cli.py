"""The operator CLI against a live fleet: watch (in a real terminal, via tmux), cmd, status, history."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from coordinator.monitor import FleetMonitor
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, ThreadedCoordinator, agent_config_dict, coordinator_config

pytestmark = pytest.mark.broker


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_watch_cmd_status_and_history_on_a_live_fleet(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config(agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-watch"), "test", environ={})
    socket_name = f"fedge-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket_name]
    monitor = FleetMonitor("127.0.0.1", broker.port, FLEET)
    with ThreadedCoordinator(coordinator_config(broker, tmp_path / "coord", tiny_model)) as service:
        agent = Agent(cfg)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: service.version >= 2, 120, "two versions")
            # env -u: the terminal's own size must rule, not a COLUMNS inherited from the test runner.
            watch = f"env -u COLUMNS -u LINES {sys.executable} -m coordinator watch --port {broker.port} --fleet {FLEET}"
            watch += " --refresh 0.5 --duration 60"
            subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "40", "-s", "w", watch], check=True, cwd=Path.cwd())
            screen = ""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not ("pi-watch" in screen and "version" in screen):
                time.sleep(0.5)
                screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True, text=True).stdout
            (tmp_path / "watch.txt").write_text(screen)
            assert "pi-watch" in screen and "coordinator online" in screen, screen
            assert "mean held-out loss by version" in screen and "strategy fedasync" in screen, screen

            out = _cli("cmd", "pi-watch", "pause", "--port", str(broker.port), "--fleet", FLEET)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "sent pause to pi-watch" in out.stdout
            wait_until(lambda: monitor.poll().devices["pi-watch"].state == "paused", 30, "the agent to pause")
            out = _cli("cmd", "pi-watch", "resume", "--port", str(broker.port), "--fleet", FLEET)
            assert out.returncode == 0
            wait_until(lambda: monitor.poll().devices["pi-watch"].state != "paused", 30, "the agent to resume")
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)
            monitor.close()
            agent.stop()
            thread.join(60)

    status = _cli("status", "--state-dir", str(tmp_path / "coord"), "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["version"] >= 2 and doc["accepted"] == doc["version"] and doc["spec"]["r"] == 4
    text = _cli("status", "--state-dir", str(tmp_path / "coord")).stdout
    assert f"global version {doc['version']}" in text

    history = _cli("history", "--state-dir", str(tmp_path / "coord"), "--json")
    versions = json.loads(history.stdout)["versions"]
    assert versions[0]["updates"] == [] and all(len(v["updates"]) == 1 for v in versions[1:])
    assert all(v["updates"][0]["device"] == "pi-watch" for v in versions[1:])
    hist = json.loads(history.stdout)["staleness_histogram"]
    assert sum(hist.values()) == doc["accepted"]
    assert "staleness of applied updates" in _cli("history", "--state-dir", str(tmp_path / "coord")).stdout


def test_cmd_to_an_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    from fedge_lab.broker import free_port

    out = _cli("cmd", "pi-1", "pause", "--port", str(free_port()))
    assert out.returncode == 5 and "cannot reach the broker" in out.stderr
