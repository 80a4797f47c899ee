"""Server-side evaluation ([eval]) against a live fleet: a child process scores the versions, and
the scores show in status, history, /metrics and watch (in a real terminal, via tmux). A scorer
that cannot start, or that is killed, never stops aggregation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator import evaluation
from coordinator.config import EvalConfig
from coordinator.store import Store
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker, free_port
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, DeviceClient, ThreadedCoordinator, agent_config_dict, coordinator_config

pytestmark = pytest.mark.broker


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True, text=True, timeout=120)


def _scores(state: Path) -> dict[int, dict]:
    store = Store(state, readonly=True)
    try:
        return store.evals()
    finally:
        store.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_versions_are_scored_in_a_child_and_shown_in_status_history_metrics_and_watch(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    held_out = device_data(2)  # text no device trains on
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(cfg, eval=EvalConfig(data_dir=str(held_out), blocks=8, seq_len=32, batch_size=4), metrics_port=free_port())
    agent_cfg = parse_config(
        agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-eval", max_rounds=3), "test", environ={}
    )
    tmux = ["tmux", "-L", f"fedge-{uuid.uuid4().hex[:8]}"]
    with ThreadedCoordinator(cfg) as service:
        assert service.evaluation is not None
        wait_until(lambda: 0 in _scores(tmp_path / "coord"), 120, "version 0 scored")
        child = service.evaluation._proc
        assert child is not None and child.pid != os.getpid()
        assert "edge_agent.scorer" in Path(f"/proc/{child.pid}/cmdline").read_bytes().decode().replace("\0", " ")
        agent = Agent(agent_cfg)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            thread.join(180)
            wait_until(lambda: service.version >= 3, 30, "three versions")
            wait_until(lambda: 3 in _scores(tmp_path / "coord"), 60, "version 3 scored")
            service._publish_status("online")
            watch = f"env -u COLUMNS -u LINES {sys.executable} -m coordinator watch --port {broker.port} --fleet {FLEET}"
            subprocess.run(
                [*tmux, "new-session", "-d", "-x", "200", "-y", "40", "-s", "w", watch + " --refresh 0.5 --duration 60"], check=True
            )
            screen, deadline = "", time.monotonic() + 30
            while time.monotonic() < deadline and "server-side held-out loss" not in screen:
                time.sleep(0.5)
                screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True, text=True).stdout
            (tmp_path / "watch.txt").write_text(screen)
            last = _scores(tmp_path / "coord")[3]
            assert f"server-side held-out loss {last['loss']:.4f} at v3" in screen, screen
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).read().decode()
            assert f'fedge_server_eval_version{{fleet="{FLEET}"}} 3.0' in metrics, metrics[-2000:]
            assert "fedge_server_eval_loss{" in metrics
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)
            agent.stop()
            thread.join(60)
    scores = _scores(tmp_path / "coord")
    assert set(scores) == {0, 1, 2, 3} and all(s["blocks"] == 8 for s in scores.values())
    assert scores[3]["loss"] != scores[0]["loss"]  # the adapter moved the model
    assert not list((tmp_path / "coord" / "eval").glob("v*.frame"))  # each frame goes once it is scored
    status = json.loads(_cli("status", "--state-dir", str(tmp_path / "coord"), "--json").stdout)
    assert status["server_eval"]["version"] == 3
    text = _cli("status", "--state-dir", str(tmp_path / "coord")).stdout
    assert f"server-side evaluation: held-out loss {scores[3]['loss']:.4f} at v3 (8 blocks)" in text
    history = json.loads(_cli("history", "--state-dir", str(tmp_path / "coord"), "--json").stdout)
    assert [v["server_eval_loss"] for v in history["versions"]] == [scores[v]["loss"] for v in range(4)]
    assert f"[held-out {scores[3]['loss']:.4f}]" in _cli("history", "--state-dir", str(tmp_path / "coord")).stdout


def test_a_scorer_that_cannot_start_or_is_killed_never_stops_aggregation(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_client: DeviceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluation, "RESTART_MIN_S", 0.5)
    cfg = coordinator_config(broker, tmp_path / "bad", tiny_model)
    with ThreadedCoordinator(replace(cfg, eval=EvalConfig(data_dir=str(tmp_path / "nowhere")))) as service:
        wait_until(lambda: service.evaluation is not None and service.evaluation.error, 120, "the scorer's setup error")
        assert "exit 4" in str(service.evaluation.error) and "does not exist" in str(service.evaluation.error)  # type: ignore[union-attr]
        meta = device_client.wait_meta(0)
        device_client.publish(device_client.update_payload(meta))
        assert device_client.wait_meta(1).version == 1  # aggregation goes on
        assert service.evaluation.status()["server_eval_error"]  # type: ignore[union-attr]

    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    cfg = coordinator_config(broker, tmp_path / "good", tiny_model)
    with ThreadedCoordinator(replace(cfg, eval=EvalConfig(data_dir=str(data), blocks=4, seq_len=32))) as service:
        ev = service.evaluation
        assert ev is not None
        wait_until(lambda: 0 in _scores(tmp_path / "good"), 120, "version 0 scored")
        first = ev._proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: ev._proc is None, 30, "the coordinator to see the scorer end")
        # It starts again (after its delay) when a version waits to be scored.
        device_client.publish(device_client.update_payload(device_client.wait_meta(0)))
        wait_until(lambda: 1 in _scores(tmp_path / "good"), 120, "version 1 scored by a new scorer")
        assert ev._proc is not None and ev._proc is not first and ev.error is None
