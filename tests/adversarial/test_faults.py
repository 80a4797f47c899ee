"""Faults rather than attackers: a broker killed -9 between autosaves, a damaged or missing
database, a full disk. Nothing acknowledged end to end is lost or applied twice."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compression.exitcodes import ExitCode
from edge_agent.state import AgentState
from fedge_lab.demo import write_toml
from fedge_lab.processes import Child
from tests.adversarial.conftest import FLEET, start_secure_fleet
from tests.conftest import wait_until

pytestmark = pytest.mark.broker

KILLS = 10


def _agent_toml(root: Path, fleet, tiny_model: Path, data: Path, **extra: object) -> Path:  # type: ignore[no-untyped-def]
    snippet = (root / "dev-a" / "agent.toml").read_text()
    password = snippet.split('password = "')[1].split('"')[0]
    return write_toml(
        root / "dev-a" / "run.toml",
        {
            "device_id": "dev-a",
            "fleet": FLEET,
            "data_dir": str(data),
            "state_dir": str(root / "agent-state"),
            "signing_key": str(root / "dev-a" / "dev-a.key"),
            "fleet_public_key": fleet.fleet_public,
            "heartbeat_s": 1.0,
            "sync_wait_s": 0.5,
            "ack_timeout_s": 2.0,
            "max_outbox": 4,
            "broker": {
                "port": fleet.broker.port,
                "username": "dev-a",
                "password": password,
                "reconnect_min_s": 0.5,
                "reconnect_max_s": 1.0,
            },
            "model": {"source": str(tiny_model), "quantize": "int8"},
            "train": {"threads": 1, "batch_size": 4, "seq_len": 32, "local_steps": 2, "eval_blocks": 2},
            **extra,
        },
    )


def test_broker_kill_9_with_the_coordinator_down_loses_no_update(
    tmp_path: Path, mosquitto_binary: str, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    # Autosave every 30 s, as in production: whatever the broker queued since is lost on kill -9.
    fleet = start_secure_fleet(tmp_path, tiny_model, broker_extra="autosave_interval 30\n")
    agent = Child(
        "agent",
        [sys.executable, "-m", "edge_agent", "run", "--config", str(_agent_toml(tmp_path, fleet, tiny_model, device_data(0)))],
        tmp_path / "agent.log",
    )
    try:
        fleet.start_coordinator(init=True)
        agent.start()
        wait_until(lambda: fleet.version() >= 1, 120, "the agent's first update applied")
        fleet.stop_coordinator()
        for _ in range(KILLS):
            fleet.broker.kill()
            fleet.broker.start()
            # The agent reconnects and sends (or resends) the oldest update it holds; the broker
            # takes it, PUBACKs it, and loses it at the next kill.
            time.sleep(2.5)
        produced = AgentState(tmp_path / "agent-state", readonly=True).seq
        assert produced >= 3
        fleet.start_coordinator()
        wait_until(lambda: not AgentState(tmp_path / "agent-state", readonly=True).pending(), 180, "every pending update confirmed")
        agent.stop()
        # SIGTERM may land inside a round: the agent commits what it trained to its outbox and sends
        # it at its next start. Such an update is pending, not lost.
        state = AgentState(tmp_path / "agent-state", readonly=True)
        produced, kept = state.seq, [int(p.stem) for p in state.pending()]
        assert kept in ([], [produced]), f"only the round SIGTERM cut short may be left, outbox holds {kept}"
        try:
            wait_until(lambda: len(fleet.ledger()) == produced - len(kept), 30, "the ledger to hold every update delivered")
        except AssertionError:
            seqs = sorted(e["seq"] for e in fleet.ledger())
            raise AssertionError(f"ledger {seqs}, outbox {kept}, {produced} produced; agent log:\n{agent.tail(40)}") from None
    finally:
        agent.stop()
        fleet.stop_coordinator()
        fleet.broker.stop()
    seqs = sorted(e["seq"] for e in fleet.ledger() if e["device"] == "dev-a")
    assert sorted(seqs + kept) == list(range(1, produced + 1)), f"lost or doubled: ledger {seqs}, outbox {kept}"
    assert not list((tmp_path / "agent-state" / "outbox").glob("rejected/*"))


def _serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", "serve", "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


def test_a_lost_or_damaged_database_is_an_error_never_a_reset(tmp_path: Path, mosquitto_binary: str, tiny_model: Path) -> None:
    fleet = start_secure_fleet(tmp_path, tiny_model)
    try:
        fleet.start_coordinator(init=True)
        wait_until(lambda: fleet.version() == 0, 60, "version 0")
        fleet.stop_coordinator()
        db = fleet.state / "coordinator.db"
        # A coordinator stopped while it still starts leaves its commits in the WAL (durable, but
        # the loop below deletes it): fold them into the database file before keeping its bytes.
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        versions = sorted(p.name for p in (fleet.state / "versions").iterdir())
        original = db.read_bytes()
        for damage in ("truncate", "delete", "garbage"):
            for p in fleet.state.glob("coordinator.db-*"):
                p.unlink()
            if damage == "truncate":
                db.write_bytes(b"")
            elif damage == "delete":
                db.unlink()
            else:
                db.write_bytes(b"\x13" * 8192)
            for args in ((), ("--init",)):
                out = _serve(fleet.coord_cfg, *args)
                assert out.returncode == ExitCode.STATE, (damage, args, out.stderr)
                assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
                assert sorted(p.name for p in (fleet.state / "versions").iterdir()) == versions
            check = subprocess.run(
                [sys.executable, "-m", "coordinator", "check", "--state-dir", str(fleet.state)], capture_output=True, text=True
            )
            assert check.returncode == ExitCode.STATE and "FAIL" in check.stdout
            db.write_bytes(original)
        check = subprocess.run(
            [sys.executable, "-m", "coordinator", "check", "--state-dir", str(fleet.state)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout
        (fleet.state / "versions" / versions[0]).write_bytes(b"damaged")
        check = subprocess.run(
            [sys.executable, "-m", "coordinator", "check", "--state-dir", str(fleet.state)], capture_output=True, text=True
        )
        assert check.returncode == ExitCode.STATE and "sha256" in check.stdout
    finally:
        fleet.broker.stop()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    )


def test_a_full_disk_neither_crashes_nor_acknowledges_and_recovers(tmp_path: Path, mosquitto_binary: str, tiny_model: Path) -> None:
    from compression import protocol
    from tests.adversarial.conftest import dense_frame, envelope

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("needs root and tmpfs to make a small full disk")
    fleet = start_secure_fleet(tmp_path, tiny_model)
    a = None
    try:
        cfg = fleet.coord_cfg.read_text().replace('state_dir = "state"', f'state_dir = "{disk / "state"}"')
        fleet.coord_cfg.write_text(cfg)
        # The enrolments live in the old state directory: move them onto the small disk.
        subprocess.run(["cp", "-a", str(fleet.state), str(disk / "state")], check=True)
        fleet.state = disk / "state"
        fleet.start_coordinator(init=True)
        wait_until(lambda: fleet.version() == 0, 60, "version 0")
        version, state = fleet.global_state()
        filler = disk / "filler"
        try:
            with filler.open("wb") as fh:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        except OSError:
            pass  # the disk is full
        a = fleet.device("dev-a")
        frame = dense_frame(state, 0.01)
        assert a.publish(protocol.device_update(FLEET, "dev-a"), envelope("dev-a", 1, frame, fleet.keys["dev-a"], base=version)) == 0
        wait_until(lambda: "storage error" in (tmp_path / "coord.log").read_text(), 30, "the storage error logged")
        time.sleep(2.0)
        assert fleet.coordinator.returncode is None  # type: ignore[union-attr]
        assert fleet.version() == 0
        filler.unlink()
        wait_until(lambda: fleet.version() == 1, 90, "the update committed once the disk has room")
        log = (tmp_path / "coord.log").read_text()
        assert "Traceback" not in log and "storage works again" in log
        assert len(fleet.ledger()) == 1
    finally:
        if a is not None:
            a.close()
        fleet.stop_coordinator()
        fleet.broker.stop()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
