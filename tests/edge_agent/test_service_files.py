"""The systemd unit and the sd_notify client."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.config import profiles_dirs
from edge_agent.sdnotify import Notifier
from edge_agent.unit import render_unit

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted({p.stem for d in profiles_dirs() if d.is_dir() for p in d.glob("*.toml")})


def test_the_shipped_unit_is_the_raspberry_pi_4_rendering() -> None:
    assert (ROOT / "devices" / "systemd" / "fedge-agent.service").read_text() == render_unit("raspberry-pi-4")


@pytest.mark.parametrize("profile", PROFILES)
def test_units_carry_the_profile_memory_limits_and_hardening(profile: str) -> None:
    unit = render_unit(profile)
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=fedge-agent", "DynamicUser=yes"):
        assert line in unit
    for line in ("ProtectSystem=strict", "NoNewPrivileges=yes", "MemoryMax=", "MemoryHigh="):
        assert line in unit
    from edge_agent.config import load_profile

    budget = load_profile(profile)["train"]["memory_budget_mb"]
    assert f"MemoryHigh={budget}M" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("profile", PROFILES)
def test_systemd_analyze_verify_accepts_the_units(profile: str, tmp_path: Path) -> None:
    # verify checks that ExecStart exists, so point the unit at this interpreter's environment.
    path = tmp_path / "fedge-agent.service"
    path.write_text(render_unit(profile, venv=sys.prefix, config=str(tmp_path / "agent.toml")))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "fedge-agent.service" not in out.stderr, out.stderr


def test_notifier_speaks_the_protocol_on_an_abstract_socket() -> None:
    name = f"fedge-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000"}, stall_s=0.6)
        assert n.enabled and n.watchdog_s == 0.2
        n.ready("starting")
        assert sock.recv(4096) == b"READY=1\nSTATUS=starting"
        assert sock.recv(4096) == b"WATCHDOG=1"  # fed while the main loop reports progress
        time.sleep(0.8)  # no alive() for longer than stall_s: the pings stop
        sock.settimeout(0.3)
        drained = []
        while True:
            try:
                drained.append(sock.recv(4096))
            except TimeoutError:
                break
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        n.alive()
        sock.settimeout(2.0)
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.stopping("bye")
        msgs = [sock.recv(4096)]
        while msgs[-1] == b"WATCHDOG=1":
            msgs.append(sock.recv(4096))
        assert msgs[-1] == b"STOPPING=1\nSTATUS=bye"
    finally:
        sock.close()


def test_notifier_is_silent_outside_systemd() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None
    n.ready("x")
    n.status("y")
    n.stopping()


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
