"""Attacks on a secured fleet through a real Mosquitto with the shipped ACL: each case of issue
"hardening", from a third-party client that builds its own bytes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import zstandard

from compression import protocol
from compression.protocol import UpdateAck
from coordinator.enrolment import enroll
from coordinator.errors import ConfigError
from tests.adversarial.conftest import FLEET, RawClient, SecureFleet, dense_frame, envelope
from tests.conftest import wait_until

pytestmark = pytest.mark.broker


def _bomb_411(claimed: int = 1 << 36) -> bytes:
    """A frame whose FEDG header says a 1,000-byte body while its zstd header claims ``claimed`` bytes."""
    body_len = 1000
    z = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * body_len)
    fhd = z[4]
    assert fhd & 0x20 and fhd & 0x03 == 0  # single segment, no dictionary id
    fcs_len = {0: 1, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    z = z[:4] + bytes([(fhd & 0x3F) | 0xC0]) + claimed.to_bytes(8, "little") + z[5 + fcs_len :]  # an 8-byte content size
    header = struct.pack("<4sBBHII", b"FEDG", 2, 1, 0, body_len, len(z))
    return header + z + struct.pack("<I", zlib.crc32(z, zlib.crc32(header)))


def _real_bomb(mib: int = 200) -> bytes:
    """A frame of ``mib`` MiB of zeros that zstd squeezes into a few KB."""
    body_len = mib << 20
    z = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(b"\0" * body_len)
    header = struct.pack("<4sBBHII", b"FEDG", 2, 1, 0, body_len, len(z))
    return header + z + struct.pack("<I", zlib.crc32(z, zlib.crc32(header)))


def _ack(fleet: SecureFleet, device: str, update_id: str) -> UpdateAck:
    """The retained ack of ``device``, once it names ``update_id`` (verified with the fleet key)."""
    from edge_agent.agent import fleet_verifier

    verify = fleet_verifier(fleet.fleet_public)  # type: ignore[attr-defined]
    reader = RawClient(fleet.broker.port, device, fleet.passwords[device], device)
    try:
        reader.client.subscribe(protocol.device_ack(FLEET, device), qos=1)

        def found() -> UpdateAck | None:
            for _t, p in reversed(reader.messages):
                ack = UpdateAck.from_json(p, verify)
                if ack.update_id == update_id:
                    return ack
            return None

        return wait_until(found, 20, f"the ack of {update_id}")  # type: ignore[return-value]
    finally:
        reader.close()


def test_zstd_bombs_are_refused_and_the_coordinator_stays_up(secure_fleet: SecureFleet) -> None:
    f = secure_fleet
    proc = psutil.Process(f.coordinator.proc.pid)  # type: ignore[union-attr]
    rss_before = proc.memory_info().rss
    a = f.device("dev-a")
    try:
        small, big = _bomb_411(), _real_bomb()
        assert len(small) < 512 and len(big) < 70_000
        assert a.publish(protocol.device_update(FLEET, "dev-a"), envelope("dev-a", 1, small, f.keys["dev-a"], base=0)) == 0
        assert a.publish(protocol.device_update(FLEET, "dev-a"), envelope("dev-a", 2, big, f.keys["dev-a"], base=0)) == 0
        wait_until(lambda: sum(f.rejections().values()) == 2, 20, "both bombs refused")
        version, state = f.global_state()
        good = envelope("dev-a", 3, dense_frame(state, 0.01), f.keys["dev-a"], base=version)
        assert a.publish(protocol.device_update(FLEET, "dev-a"), good) == 0
        wait_until(lambda: f.version() == 1, 20, "the next good update applied")
    finally:
        a.close()
    assert f.coordinator.returncode is None  # type: ignore[union-attr]
    assert f.rejections() == {"malformed_frame": 1, "too_large": 1}
    assert proc.memory_info().rss - rss_before < 64 << 20


def test_a_poison_message_is_refused_quarantined_acknowledged_and_never_redelivered(secure_fleet: SecureFleet) -> None:
    """A bomb that the old decoder turned into MemoryError stands for every message whose handling raises."""
    f = secure_fleet
    a = f.device("dev-a")
    try:
        payload = envelope("dev-a", 1, _bomb_411(), f.keys["dev-a"], base=0, uid="bomb-1")
        assert a.publish(protocol.device_update(FLEET, "dev-a"), payload) == 0
        ack = _ack(f, "dev-a", "bomb-1")
        assert ack.outcome == "rejected" and "zstd" in (ack.reason or "")
    finally:
        a.close()
    f.stop_coordinator()
    version, state = f.global_state()
    a = f.device("dev-a")
    try:
        # A sentinel queued behind anything the broker would redeliver: once it is applied,
        # a redelivered bomb would have been handled (and counted) before it.
        assert (
            a.publish(protocol.device_update(FLEET, "dev-a"), envelope("dev-a", 2, dense_frame(state, 0.01), f.keys["dev-a"], base=version))
            == 0
        )
        f.start_coordinator()
        wait_until(lambda: f.version() == 1, 30, "the sentinel applied")
    finally:
        a.close()
    assert f.rejections() == {"malformed_frame": 1}


def test_a_device_cannot_take_over_the_coordinators_session_or_another_devices(secure_fleet: SecureFleet) -> None:
    f = secure_fleet
    version, state = f.global_state()
    f.stop_coordinator()  # its persistent session now queues the devices' updates
    a = f.device("dev-a")
    uids = [f"a-{i}" for i in range(3)]
    for i, uid in enumerate(uids):
        frame = dense_frame(state, 0.001)
        assert (
            a.publish(protocol.device_update(FLEET, "dev-a"), envelope("dev-a", i + 1, frame, f.keys["dev-a"], base=version, uid=uid)) == 0
        )
    # Device B with its own credentials asks for the coordinator's client id and old session,
    # then for A's: the broker gives B its own id (use_username_as_clientid).
    for wanted in ("coordinator", f"coordinator-{FLEET}", "dev-a"):
        b = RawClient(f.broker.port, "dev-b", f.passwords["dev-b"], wanted, clean_start=False)
        b.client.subscribe(protocol.all_updates(FLEET), qos=1)
        time.sleep(0.5)
        assert not b.messages, f"dev-b as {wanted!r} received {len(b.messages)} messages of another session"
        b.close()
    assert a.connected.is_set() and a.disconnects == 0  # A was never knocked offline
    a.close()
    f.start_coordinator()
    wait_until(lambda: f.version() == 3, 30, "all three queued updates applied")
    assert sorted(e["update_id"] for e in f.ledger()) == uids


def test_one_device_cannot_set_the_global_model(tmp_path: Path, mosquitto_binary: str, tiny_model: Path) -> None:
    from tests.adversarial.conftest import start_secure_fleet

    f = start_secure_fleet(tmp_path, tiny_model, coordinator={"strategy": {"kind": "fedbuff", "buffer_size": 2}})
    f.start_coordinator(init=True)
    a = b = None
    try:
        wait_until(lambda: f.version() == 0, 60, "version 0")
        version, state = f.global_state()
        norm0 = float(np.sqrt(sum(float(np.square(v).sum()) for v in state.values())))
        a, b = f.device("dev-a"), f.device("dev-b")
        topic_a, topic_b = protocol.device_update(FLEET, "dev-a"), protocol.device_update(FLEET, "dev-b")
        # Values of 1e3: far past the adaptive bound (4x the global state's norm until norms are known).
        assert b.publish(topic_b, envelope("dev-b", 1, dense_frame(state, 1e3), f.keys["dev-b"], base=version)) == 0
        # Values of 1e38, again and again: their norm overflows; nothing reaches the downlink residual.
        for seq in range(2, 5):
            assert b.publish(topic_b, envelope("dev-b", seq, dense_frame(state, 1e38), f.keys["dev-b"], base=version)) == 0
        # 10^12 samples against an honest device's 4.
        assert a.publish(topic_a, envelope("dev-a", 1, dense_frame(state, 0.01), f.keys["dev-a"], base=version, samples=4)) == 0
        assert b.publish(topic_b, envelope("dev-b", 5, dense_frame(state, -0.01), f.keys["dev-b"], base=version, samples=10**12)) == 0
        wait_until(lambda: f.version() == 1, 30, "the buffer of two honest-sized updates")
        _v, after = f.global_state()
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        f.stop_coordinator()
        f.broker.stop()
    rej = f.rejections()
    assert rej == {"norm_bound": 4}
    weights = {e["device"]: (e["num_samples"], e["weight"]) for e in f.ledger()}
    assert weights["dev-b"][0] <= 4 * 4  # capped at 4x the other device's count
    assert weights["dev-b"][1] <= 0.8 + 1e-6
    norm1 = float(np.sqrt(sum(float(np.square(v).sum()) for v in after.values())))
    assert abs(norm1 - norm0) < 1.0


def test_defaults_refuse_strangers_and_junk_is_counted_by_its_real_reason(secure_fleet: SecureFleet) -> None:
    f = secure_fleet
    a = f.device("dev-a")
    try:
        version, state = f.global_state()
        topic = protocol.device_update(FLEET, "dev-a")
        frame = dense_frame(state, 0.01)
        assert a.publish(topic, envelope("dev-a", 1, frame, None, base=version)) == 0  # unsigned
        for junk in (b"", b"FEV2", b"\xff" * 100, b"FEV1" + struct.pack("<I", 5) + b"{}{}{"):
            assert a.publish(topic, junk) == 0
        good = envelope("dev-a", 2, frame, f.keys["dev-a"], base=version)
        assert a.publish(topic, good) == 0
        assert a.publish(topic, good) == 0  # a resend: confirmed again, never applied twice
        assert a.publish(topic, envelope("dev-a", 2, frame, f.keys["dev-a"], base=version)) == 0  # a replayed seq
        # Cross-fleet: under its own id, but in another fleet's topics.
        assert a.publish(protocol.device_update("other", "dev-a"), good) == 135
        assert a.publish(protocol.global_meta(FLEET), b"{}", retain=True) == 135
        wait_until(lambda: sum(f.rejections().values()) == 6, 20, "every refusal counted")
    finally:
        a.close()
    assert f.rejections() == {"unsigned": 1, "malformed_message": 4, "replayed": 1}
    assert f.version() == 1 and len(f.ledger()) == 1
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "coordinator", "status", "--state-dir", str(f.state), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert status["version"] == 1


def test_enroll_refuses_reserved_names_and_existing_devices(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name in ("coordinator", "operator", "coordinator-home"):
        with pytest.raises(ConfigError, match="reserved"):
            enroll(state, name, tmp_path / name, fleet="home", broker_host="h", broker_port=1)
    enroll(state, "pi-1", tmp_path / "pi-1", fleet="home", broker_host="h", broker_port=1)
    with pytest.raises(ConfigError, match="already enrolled"):
        enroll(state, "pi-1", tmp_path / "pi-1b", fleet="home", broker_host="h", broker_port=1)
    report = enroll(state, "pi-1", tmp_path / "pi-1c", fleet="home", broker_host="h", broker_port=1, force=True)
    assert f'fleet_public_key = "{report["fleet_public_key"]}"' in (tmp_path / "pi-1c" / "agent.toml").read_text()
