"""`fedge-coordinator testbed` end to end: real and simulated agents, churn, a broker restart, impairment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge_lab.netem import netns_supported
from fedge_lab.testbed_config import AgentGroup, ChurnPlan, SimSettings, TestbedConfig, load_testbed_config

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run(config: Path, run_dir: Path, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "testbed", str(config), "--run-dir", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((run_dir / "report.json").read_text())
    return report


def test_mixed_fleet_with_churn_and_a_broker_restart(tmp_path: Path, mosquitto_binary: str) -> None:
    config = tmp_path / "testbed.toml"
    config.write_text(
        """
duration_s = 40
fleet = "lab"
start_delay_s = 3
model = "tiny"

[strategy]
kind = "fedbuff"
buffer_size = 5

[sim]
step_s = 0.5
processes = 2
heartbeat_s = 5

[[agents]]
kind = "real"
count = 2
profile = "raspberry-pi-4"
speed = 1

[[agents]]
kind = "sim"
count = 30
speed = 1

[[agents]]
kind = "sim"
count = 10
speed = 10

[churn]
kill_every_s = 14
restart_after_s = 3
sim_drops_per_min = 2
sim_down_s = 2

[broker_restart]
at_s = 22
down_s = 2
"""
    )
    run_dir = tmp_path / "run"
    report = _run(config, run_dir, timeout=240)
    events = [e["what"] for e in report["events"]]
    assert any(e.startswith("SIGKILL agent") for e in events), events
    assert any(e.startswith("restarted agent") for e in events), events
    assert any(e.startswith("broker SIGTERM") for e in events) and any(e.startswith("broker restarted") for e in events), events
    restart_t = next(e["t"] for e in report["events"] if e["what"].startswith("broker restarted"))
    # The fleet trains on after the broker came back: versions published after the restart.
    assert any(t > restart_t for t, _, _ in report["loss_history"]), report["loss_history"][-3:]
    assert report["final_version"] >= 5
    assert report["rejections"].get("malformed", 0) == 0
    fleets = report["sim_fleet"]
    assert sum(f["drops"] for f in fleets) > 0 and sum(f["connects"] for f in fleets) > 40
    assert report["devices"] == {"real-1x": 2, "sim-1x": 30, "sim-10x": 10}
    # Real agents sent updates too (their ledger rows name them).
    ledger = subprocess.run(
        [sys.executable, "-m", "coordinator", "history", "--state-dir", str(run_dir / "coordinator" / "state"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "agent0" in ledger.stdout, ledger.stdout[-1000:] + ledger.stderr[-1000:]
    # Everything was stopped by PID.
    for path in (run_dir / "logs").glob("*.log"):
        assert "Traceback" not in path.read_text(errors="replace") or path.name.startswith("agent"), path
    pids = [int(line.split("pid ")[1].split(")")[0]) for line in events if "(pid " in line]
    assert pids and not any(_pid_alive(p) for p in pids)
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_simulated_fleet_scores_versions_and_the_loss_falls(tmp_path: Path, mosquitto_binary: str) -> None:
    from coordinator.strategy import StrategyConfig
    from fedge_lab.lab import Testbed

    cfg = TestbedConfig(
        duration_s=15,
        seed=3,
        model="sim",
        start_delay_s=2,
        strategy=StrategyConfig(kind="fedbuff", buffer_size=10),
        agents=(AgentGroup(count=60, speed=1.0), AgentGroup(count=20, speed=3.0)),
        sim=SimSettings(step_s=0.5, processes=2, hidden=128, layers=2),
        churn=ChurnPlan(),
    )
    bed = Testbed(cfg, tmp_path / "run")
    try:
        bed.start()
        assert bed.run(stop_when=lambda s: bool(s.latest and s.latest[1] >= 15)) == "target"
    finally:
        codes = bed.stop()
    report = bed.report(codes)
    losses = [loss for _, _, loss in report["loss_history"]]
    assert losses[0] == pytest.approx(1.0, abs=1e-5)
    assert min(losses) < 0.9
    sent = bed.sent()
    assert len(sent) >= report["counts"]["accepted"] > 0
    assert all(r["bytes"] * 20 < r["dense"] for r in sent)  # real default-codec frames
    assert len({r["device"] for r in sent}) > 40


@pytest.mark.skipif(netns_supported() is not None, reason=str(netns_supported()))
def test_impaired_devices_reach_the_broker_through_their_namespace(tmp_path: Path, mosquitto_binary: str) -> None:
    config = tmp_path / "testbed.toml"
    config.write_text(
        """
duration_s = 12
start_delay_s = 2
model = "sim"

[strategy]
kind = "fedbuff"
buffer_size = 4

[sim]
step_s = 0.5
processes = 1
hidden = 128
layers = 2

[impairment]
rate_kbit = 4000

[[agents]]
count = 8
impaired = true

[[agents]]
count = 8
"""
    )
    run_dir = tmp_path / "run"
    report = _run(config, run_dir, timeout=120)
    assert report["impairment"] and ("tbf" in report["impairment"] or "netem" in report["impairment"])
    plans = sorted((run_dir / "sim").glob("simfleet*.json"))
    impaired_plan = next(json.loads(p.read_text()) for p in plans if json.loads(p.read_text())["host"] != "127.0.0.1")
    impaired_ids = {d["id"] for d in impaired_plan["devices"]}
    sent = [json.loads(line) for p in plans for line in p.with_suffix(".log").read_text().splitlines()]
    assert any(r["device"] in impaired_ids for r in sent), "no update came through the impaired link"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "fedge-tb-" not in names


def test_bad_testbed_configs_are_refused_with_the_key(tmp_path: Path) -> None:
    from coordinator.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text('duration_s = 10\n[[agents]]\ncount = 5\nkind = "real"\nspeed = 0.5\n')
    with pytest.raises(ConfigError, match="speed"):
        load_testbed_config(bad)
    bad.write_text("duration_s = 10\n[[agents]]\ncount = 5\nimpaired = true\n")
    with pytest.raises(ConfigError, match="impairment"):
        load_testbed_config(bad)
    bad.write_text("duration_s = 10\nagents = []\n")
    with pytest.raises(ConfigError, match="at least one agent"):
        load_testbed_config(bad)
    proc = subprocess.run([sys.executable, "-m", "coordinator", "testbed", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "at least one agent" in proc.stderr
