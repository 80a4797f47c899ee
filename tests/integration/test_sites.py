"""Sites against real Mosquitto bridges: a root broker, two bridged site brokers, the root
coordinator and two site aggregators as processes (``fedge_lab.sites``), and devices at each
site. kill -9 of either tier, a bridge cut, and devices following the root through the bridges."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compression import state_digest
from coordinator.identity import public_hex
from coordinator.site import load_signing_key
from coordinator.store import Store
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.scoring import write_sim_model
from fedge_lab.sites import SiteLab, wait_until
from tests.integration.conftest import FLEET, agent_config_dict

pytestmark = pytest.mark.broker


@pytest.fixture
def sim_model(tmp_path: Path) -> str:
    return str(write_sim_model(tmp_path / "sim-model", 64, 2))


def _check_exactly_once(lab: SiteLab) -> dict[str, Any]:
    """Every update a site acknowledged (its ledger) is covered by exactly one partial the root committed,
    the tiers' records of each partial agree, and every group of every partial is in one root version."""
    root_covered = lab.root_covered()
    totals: dict[str, Any] = {}
    with lab.db(lab.root_state) as db:
        root_partials = {r[0]: (r[1], r[2]) for r in db.execute("SELECT partial_id, site, updates FROM partials")}
        root_version = int(db.execute("SELECT MAX(version) FROM versions").fetchone()[0])
        groups = db.execute("SELECT update_id, applied_version, num_samples FROM ledger WHERE device LIKE 'site:%'").fetchall()
        assert db.execute("SELECT COUNT(*) FROM buffer").fetchone()[0] == 0
    group_versions = {uid.split("/")[0]: [] for uid, _, _ in groups}
    for uid, applied, _ in groups:
        assert 1 <= applied <= root_version
        group_versions[uid.split("/")[0]].append(applied)
    assert set(group_versions) == set(root_partials), "every committed partial's groups are in the root's ledger"
    for node in lab.nodes:
        with lab.db(node.state_dir) as db:
            acked = {r[0]: r[1] for r in db.execute("SELECT partial_id, updates FROM site_partials WHERE acked IS NOT NULL")}
            unacked = db.execute("SELECT COUNT(*) FROM site_partials WHERE acked IS NULL").fetchone()[0]
            ledger = {r[0] for r in db.execute("SELECT update_id FROM ledger")}
            forwarded = {r[0]: r[1] for r in db.execute("SELECT update_id, partial_id FROM partial_updates")}
        assert unacked == 0
        assert ledger == set(forwarded), f"{node.name}: every update in its ledger was forwarded in a partial"
        mine = {u: p for u, p in root_covered.items() if root_partials[p][0] == node.name}
        assert mine == forwarded, f"{node.name}: the root covers exactly the updates the site forwarded, in the same partials"
        assert {p: n for p, (s, n) in root_partials.items() if s == node.name} == acked, f"{node.name}: the tiers' partials agree"
        totals[node.name] = {"updates": len(ledger), "partials": len(acked)}
    return totals


def _sent_counts(lab: SiteLab) -> dict[str, int]:
    """Updates each simulated device sent (its fleet process logs one line per update)."""
    counts: dict[str, int] = {}
    for path in (lab.work / "sim").glob("*.log"):
        for line in path.read_text().splitlines():
            device = json.loads(line)["device"]
            counts[device] = counts.get(device, 0) + 1
    return counts


def _refused(lab: SiteLab) -> dict[str, int]:
    refused: dict[str, int] = {}
    for node in lab.nodes:
        with lab.db(node.state_dir) as db:
            for device, n in db.execute("SELECT device, COUNT(*) FROM rejections GROUP BY device"):
                refused[device] = refused.get(device, 0) + int(n)
    return refused


def _unaccounted(lab: SiteLab) -> dict[str, tuple[int, int, int]]:
    """Devices whose sent updates are not all at the root or refused by their site: (sent, at the root, refused)."""
    covered: dict[str, int] = {}
    for uid in lab.root_covered():
        device = uid.rsplit("-", 1)[0]
        covered[device] = covered.get(device, 0) + 1
    sent, refused = _sent_counts(lab), _refused(lab)
    return {d: (n, covered.get(d, 0), refused.get(d, 0)) for d, n in sent.items() if covered.get(d, 0) + refused.get(d, 0) != n}


def _settle(lab: SiteLab) -> None:
    """Until every site is drained and every sent update is accounted for: the last updates the devices
    sent may still be on their way through a site's broker when the site's buffer is momentarily empty."""
    try:
        wait_until(lambda: lab.drained() and not _unaccounted(lab), 120, "the tiers to settle")
    except TimeoutError:
        pass  # the assertions that follow say what is missing


def _nothing_lost(lab: SiteLab) -> None:
    """Every update a device sent is at the root, or was refused with a reason by its site."""
    lost = _unaccounted(lab)
    assert not lost, f"device: (sent, at the root, refused) where they do not add up: {lost}"


def test_kill9_of_a_site_aggregator_and_of_the_root_10_times_each_counts_every_update_exactly_once(tmp_path: Path, sim_model: str) -> None:
    lab = SiteLab(tmp_path, 2, source=sim_model, site_options={"partial_every_s": 0.5, "resend_s": 3.0})
    rng = random.Random(7)
    try:
        lab.start()
        wait_until(lambda: lab.root_version() >= 0 and all((n.state_dir / "coordinator.db").exists() for n in lab.nodes), 60, "the tiers")
        lab.start_sim(20, step_s=0.5, sync_wait_s=2.0)
        wait_until(lambda: lab.root_version() >= 5, 90, "the root's first versions from partials")
        for target in ["site"] * 10 + ["root"] * 10:
            time.sleep(rng.uniform(1.0, 2.5))  # under load: devices keep sending
            if target == "site":
                lab.kill_site(0)
                time.sleep(rng.uniform(0.5, 1.5))
                lab.start_site(0)
            else:
                lab.kill_root()
                time.sleep(rng.uniform(0.5, 1.5))
                lab.start_root()
        v_before = lab.root_version()
        wait_until(lambda: lab.root_version() > v_before, 90, "the root to make versions after the last restart")
        lab.stop_sims()
        _settle(lab)
        assert lab.drained(), f"every site's buffer and partials drain: {lab.status()}"
        totals = _check_exactly_once(lab)
        assert all(t["updates"] > 50 and t["partials"] > 5 for t in totals.values()), totals
        _nothing_lost(lab)
    finally:
        lab.stop()
    for node in lab.nodes:  # the killed tier resumed each time without refusing its own state
        assert "Traceback" not in (lab.work / "logs" / f"{node.name}.log").read_text()
    assert "Traceback" not in (lab.work / "logs" / "root.log").read_text()


def test_a_bridge_cut_for_30s_delays_updates_and_loses_none_and_the_root_sees_it(tmp_path: Path, sim_model: str) -> None:
    lab = SiteLab(tmp_path, 2, source=sim_model, site_options={"partial_every_s": 0.5, "resend_s": 5.0})
    try:
        lab.start()
        wait_until(lambda: lab.root_version() >= 0, 60, "the root")
        lab.start_sim(10, step_s=0.5, sync_wait_s=2.0)
        wait_until(lambda: len(lab.root_covered()) >= 40, 90, "updates through both sites")

        def bridge(site: str) -> str | None:
            with lab.db(lab.root_state) as db:
                row = db.execute("SELECT bridge FROM sites WHERE site=?", (site,)).fetchone()
            return None if row is None else str(row[0])

        wait_until(lambda: bridge("site-b") == "up", 30, "the root to see site-b's bridge up")
        lab.relays[1].cut()
        cut_at = time.monotonic()
        wait_until(lambda: bridge("site-b") == "down", 60, "the root to see site-b's bridge down (its will)")
        covered_b = {u for u in lab.root_covered() if u.startswith("site-b")}
        _root_shows_the_cut(lab)
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        during = {u for u in lab.root_covered() if u.startswith("site-b")}
        assert len(during) - len(covered_b) <= 0, "nothing of site-b reached the root while its bridge was cut"
        with lab.db(lab.nodes[1].state_dir) as db:
            waiting = db.execute("SELECT COUNT(*) FROM site_partials WHERE acked IS NULL").fetchone()[0]
            waiting += db.execute("SELECT COUNT(*) FROM buffer").fetchone()[0]
        assert waiting > 0, "site-b kept accepting its devices' updates during the cut"
        log_b = (lab.work / "logs" / "site-b.log").read_text()
        assert "the bridge to the root is down" in log_b, "site-b heard its own bridge go down and stopped resending"
        lab.relays[1].restore()
        wait_until(lambda: bridge("site-b") == "up", 60, "site-b's bridge to reconnect")
        lab.stop_sims()
        _settle(lab)
        assert lab.drained(), f"every site's partials are acknowledged: {lab.status()}"
        _check_exactly_once(lab)
        _nothing_lost(lab)
        assert len({u for u in lab.root_covered() if u.startswith("site-b")}) > len(during)
    finally:
        lab.stop()


def test_devices_in_two_sites_end_bit_identical_to_the_roots_versions(tmp_path: Path, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    lab = SiteLab(tmp_path / "lab", 2, source=str(tiny_model), lora_r=4, fleet=FLEET)
    lab.start()
    agents: list[Agent] = []
    threads: list[threading.Thread] = []
    try:
        wait_until(lambda: lab.root_version() >= 0, 60, "the root")
        for i, node in enumerate(lab.nodes):
            site_key = public_hex(load_signing_key(str(tmp_path / "lab" / node.name / "secrets" / f"{node.name}.key")))
            raw = agent_config_dict(node.broker, tiny_model, device_data(i), tmp_path / f"agent{i}", f"{node.name}-pi")
            raw.update(lab_mode=False, fleet_public_key=lab.fleet_public, site_public_key=site_key)
            agent = Agent(parse_config(raw, "test", environ={}))
            agents.append(agent)
            threads.append(threading.Thread(target=agent.run, daemon=True))
            threads[-1].start()
        wait_until(lambda: all(a.counters.rounds >= 2 for a in agents), 300, "two rounds on each device")
        for a in agents:
            a.paused = True  # they stop training and keep following the global versions
        # Each agent's updates were acknowledged by its site (acks signed by the site's key, not the root's).
        wait_until(lambda: all(not a.state.pending() for a in agents), 60, "every update acknowledged by its site")
        wait_until(_drained_and_counted(lab, agents), 60, "every update of both sites in the root's versions")
        final = lab.root_version()
        wait_until(
            lambda: all(a.global_model is not None and a.global_model.version == final for a in agents),
            60,
            "both devices on the last version",
        )
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(30)
        lab.stop()
    assert final >= 4
    stores = [Store(d, readonly=True) for d in [lab.root_state, *(n.state_dir for n in lab.nodes)]]
    try:
        root_state, *site_states = [st.load_version(final)[0] for st in stores]
    finally:
        for st in stores:
            st.close()
    # Global versions came down both bridges unchanged: every device and every site holds the root's, bit for bit.
    for agent in agents:
        assert agent.global_model is not None and state_digest(agent.global_model.tensors) == state_digest(root_state)
        assert all(np.array_equal(agent.global_model.tensors[k], root_state[k]) for k in root_state)
    for site_state in site_states:
        assert all(np.array_equal(site_state[k], root_state[k]) for k in root_state)


def _drained_and_counted(lab: SiteLab, agents: list[Agent]) -> Any:
    sent = sum(a.counters.updates_sent for a in agents)
    return lambda: lab.drained() and len(lab.root_covered()) == sent


def _root_shows_the_cut(lab: SiteLab) -> None:
    """The fleet view at the root, during site-b's bridge cut: status, devices, watch and /metrics."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "coordinator", "status", "--state-dir", str(lab.root_state), "--json"],
            capture_output=True, text=True, check=True, env=env, timeout=60,
        ).stdout
    )  # fmt: skip
    sites = {r["site"]: r for r in status["sites"]}
    assert sites["site-b"]["bridge"] == "down" and sites["site-a"]["bridge"] == "up"
    assert sites["site-a"]["aggregator"] == "online" and sites["site-a"]["partials"] > 0 and sites["site-a"]["devices_online"] == 10
    assert sites["site-a"]["lag_versions"] is not None
    devices = subprocess.run(
        [sys.executable, "-m", "coordinator", "devices", "--state-dir", str(lab.root_state)],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    assert "site-b: aggregator online, bridge down" in devices
    watch = subprocess.run(
        [sys.executable, "-m", "coordinator", "watch", "--host", "127.0.0.1", "--port", str(lab.root_broker.port),  # type: ignore[union-attr]
         "--fleet", lab.fleet, "--once", "--settle", "2"],
        capture_output=True, text=True, check=True, env={**env, "COLUMNS": "200"}, timeout=60,
    ).stdout  # fmt: skip
    line_b = next(line for line in watch.splitlines() if "site-b" in line)
    assert "down" in line_b and "online" in line_b
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{lab.root_metrics_port}/metrics", timeout=10).read().decode()
    assert f'fedge_site_bridge_up{{fleet="{lab.fleet}",site="site-b"}} 0.0' in metrics
    assert f'fedge_site_bridge_up{{fleet="{lab.fleet}",site="site-a"}} 1.0' in metrics
    assert f'fedge_site_devices_online{{fleet="{lab.fleet}",site="site-a"}} 10.0' in metrics
    assert f'fedge_site_updates_total{{fleet="{lab.fleet}",site="site-a"}}' in metrics
