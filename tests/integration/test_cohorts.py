"""Cohorts against Mosquitto: invitations, the concurrency bound, dropouts, refusals, and a
simulated fleet that trains only when invited."""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from compression import protocol
from compression.keys import ed25519_verifier
from compression.protocol import CohortInvite, DeviceStatus, GlobalMeta, UpdateAck
from coordinator.cohorts import CohortConfig
from coordinator.identity import fleet_key
from coordinator.store import Store
from coordinator.strategy import StrategyConfig
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from fedge_lab.broker import MosquittoBroker
from fedge_lab.demo import serve_argv
from fedge_lab.processes import Child
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, DeviceClient, ThreadedCoordinator, agent_config_dict, coordinator_config, coordinator_toml

pytestmark = pytest.mark.broker


class CohortDevice(DeviceClient):
    """A device client that says it waits for work, and hears its invitations and acks."""

    def __init__(self, port: int, device: str) -> None:
        self.invites: queue.Queue[bytes] = queue.Queue()
        self.acks: queue.Queue[UpdateAck] = queue.Queue()
        self.verify: protocol.Verifier | None = None
        self.seen: dict[int, GlobalMeta] = {}
        super().__init__(port, device)
        self.client.subscribe([(protocol.device_invites(FLEET, device), 1), (protocol.device_ack(FLEET, device), 1)])

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if "/cohorts/" in msg.topic:
            self.invites.put(bytes(msg.payload))
        elif msg.topic.endswith("/ack"):
            if msg.payload:
                self.acks.put(UpdateAck.from_json(msg.payload))
        else:
            super()._on_message(c, u, msg)
            if msg.topic.endswith("/meta"):
                meta = GlobalMeta.from_json(msg.payload)
                self.seen[meta.version] = meta

    def announce(self, state: str = "waiting") -> None:
        payload = DeviceStatus(state=state, version=0, ts=time.time()).to_json()
        self.client.publish(protocol.device_status(FLEET, self.device), payload, qos=1, retain=True).wait_for_publish(10)

    def invite(self, timeout: float = 20.0) -> CohortInvite:
        """The next invitation, which must carry the fleet key's signature."""
        return CohortInvite.from_json(self.invites.get(timeout=timeout), self.verify)

    def ack(self, update_id: str, timeout: float = 20.0) -> UpdateAck:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ack = self.acks.get(timeout=left)
            except queue.Empty:
                break
            if ack.update_id == update_id:
                return ack
        raise AssertionError(f"no ack for {update_id} within {timeout:.0f}s")

    def send(self, base: int, cohort: str) -> str:
        wait_until(lambda: base in self.seen, 20, f"{self.device} to see v{base}")
        payload = self.update_payload(self.seen[base], scale=0.01)
        header, frame = protocol.decode_envelope(payload)
        header = replace(header, cohort=cohort)
        self.publish(protocol.encode_envelope(header, frame))
        return header.update_id


def test_devices_train_only_when_invited_at_most_concurrency_at_once(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cohorts = CohortConfig(enabled=True, concurrency=2, size=2, deadline_s=6.0, seed=5)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedbuff", buffer_size=2), cohorts=cohorts)
    devices = [CohortDevice(broker.port, f"dev-{i}") for i in range(4)]
    for d in devices:
        d.announce()  # retained: the coordinator sees four waiting devices when it starts
    try:
        with ThreadedCoordinator(cfg) as service:
            public = fleet_key(cfg.state_dir, create=False).public_key()
            for d in devices:
                d.verify = lambda sig, msg: _verifies(public, sig, msg)
                assert d.wait_meta(0).cohorts is True
            wait_until(lambda: sum(not d.invites.empty() for d in devices) >= 2, 20, "a first cohort's invitations")
            assert service.cohorts.in_flight == 2
            first = [d for d in devices if not d.invites.empty()]
            invites = [d.invite() for d in first]
            assert len(first) == 2 and {i.cohort for i in invites} == {"c00000001"} and all(i.version == 0 for i in invites)
            time.sleep(1.0)
            assert sum(not d.invites.empty() for d in devices) == 0  # the bound: nobody else is invited yet

            outsider = next(d for d in devices if d not in first)
            refused = outsider.ack(outsider.send(0, "c00000001"))
            assert refused.outcome == "rejected" and refused.reason and refused.reason.startswith("not_invited")

            uids = [d.send(0, inv.cohort) for d, inv in zip(first, invites, strict=True)]
            assert sorted(d.ack(u).outcome for d, u in zip(first, uids, strict=True)) == ["applied", "buffered"]
            devices[0].wait_meta(1)

            # Their slots are free: the next cohort is sampled from all four, and nobody answers it.
            wait_until(lambda: sum(not d.invites.empty() for d in devices) >= 2, 20, "a second cohort's invitations")
            second = [(d, d.invite()) for d in devices if not d.invites.empty()]
            assert len(second) == 2 and all(inv.cohort == "c00000002" and inv.version == 1 for _d, inv in second)
            wait_until(lambda: service.cohorts.dropouts >= 2, 20, "the second cohort's dropouts")
            late_device, late_invite = second[0]
            late = late_device.ack(late_device.send(1, late_invite.cohort))
            assert late.outcome == "rejected" and "not_invited" in (late.reason or "")
            wait_until(lambda: service.cohorts.planner.number >= 3, 20, "a third cohort after the dropouts")
            sample = service.metrics.registry.get_sample_value
            assert sample("fedge_cohorts_opened", {"fleet": FLEET}) >= 3
            assert sample("fedge_cohort_dropouts", {"fleet": FLEET}) >= 2
            assert sample("fedge_cohort_devices_in_flight", {"fleet": FLEET}) == service.cohorts.in_flight
    finally:
        for d in devices:
            d.close()
    db = sqlite3.connect(f"file:{tmp_path / 'coord' / 'coordinator.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT cohort, eligible, members FROM cohorts ORDER BY number").fetchall()
    # The first cohort is sampled from the devices whose retained statuses the coordinator had
    # taken by then: all four, or the first two or three if they came in separate batches.
    assert rows[0][0] == "c00000001" and 2 <= rows[0][1] <= 4 and len(json.loads(rows[0][2])) == 2
    states = dict(db.execute("SELECT state, COUNT(*) FROM cohort_members WHERE cohort IN ('c00000001', 'c00000002') GROUP BY state"))
    assert states == {"reported": 2, "dropped": 2}
    reasons = [r[0] for r in db.execute("SELECT reason FROM rejections")]
    assert reasons.count("not_invited") == 2
    from coordinator.cli.status import collect

    shown = collect(str(tmp_path / "coord"))["cohorts"]
    assert shown["opened"] >= 3 and shown["reported"] == 2 and shown["dropped"] >= 2 and shown["last"]["members"] == 2


def _verifies(public: Ed25519PublicKey, sig: bytes, msg: bytes) -> bool:
    return ed25519_verifier(public)(sig, msg)


def test_a_real_agent_waits_for_its_invitation_and_answers_it(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, device_data
) -> None:  # type: ignore[no-untyped-def]
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cohorts = CohortConfig(enabled=True, concurrency=1, size=1, deadline_s=120.0, fill_wait_s=0.0)
    cfg = replace(cfg, strategy=StrategyConfig(kind="fedasync"), cohorts=cohorts)
    raw = agent_config_dict(broker, tiny_model, device_data(0), tmp_path / "agent", "pi-c", sync_wait_s=1.0)
    agent = Agent(parse_config(raw, "test", environ={}))
    with ThreadedCoordinator(cfg) as service:
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: service.version >= 2, 120, "two versions from two invitations")
        finally:
            agent.stop()
            thread.join(60)
    ledger = list(Store(tmp_path / "coord", readonly=True).ledger())
    assert [e["device"] for e in ledger][:2] == ["pi-c", "pi-c"]
    db = sqlite3.connect(f"file:{tmp_path / 'coord' / 'coordinator.db'}?mode=ro", uri=True)
    members = db.execute("SELECT cohort, device, state FROM cohort_members ORDER BY cohort").fetchall()
    assert members[:2] == [("c00000001", "pi-c", "reported"), ("c00000002", "pi-c", "reported")]
    assert not [r for r in db.execute("SELECT reason FROM rejections")]  # it never trained uninvited


def test_a_coordinator_killed_with_9_resumes_its_open_cohort(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cohorts = {"enabled": True, "concurrency": 2, "size": 2, "deadline_s": 120.0, "seed": 3}
    cfg_path = coordinator_toml(
        tmp_path / "coordinator.toml", broker, tiny_model, strategy={"kind": "fedbuff", "buffer_size": 2}, cohorts=cohorts
    )
    devices = [CohortDevice(broker.port, f"dev-{i}") for i in range(3)]
    for d in devices:
        d.announce()
    child = Child("coordinator", serve_argv(cfg_path), tmp_path / "coord.log").start()
    try:
        wait_until(lambda: sum(not d.invites.empty() for d in devices) >= 2, 60, "the first cohort's invitations")
        first = {d.device: d.invite() for d in devices if not d.invites.empty()}
        assert child.proc is not None
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
        child = Child("coordinator", serve_argv(cfg_path), tmp_path / "coord.log").start()
        # The open invitations come again after the restart: the same cohort, the same members.
        wait_until(lambda: sum(not d.invites.empty() for d in devices) >= 2, 60, "the invitations sent again")
        again = {d.device: d.invite() for d in devices if not d.invites.empty()}
        assert {k: (v.cohort, v.version, v.deadline) for k, v in again.items()} == {
            k: (v.cohort, v.version, v.deadline) for k, v in first.items()
        }
        members = [d for d in devices if d.device in first]
        uids = [d.send(0, first[d.device].cohort) for d in members]
        assert sorted(d.ack(u).outcome for d, u in zip(members, uids, strict=True)) == ["applied", "buffered"]
    finally:
        child.stop()
        for d in devices:
            d.close()
    db = sqlite3.connect(f"file:{tmp_path / 'state' / 'coordinator.db'}?mode=ro", uri=True)
    assert db.execute("SELECT COUNT(*) FROM cohorts WHERE cohort = 'c00000001'").fetchone() == (1,)
    states = dict(db.execute("SELECT state, COUNT(*) FROM cohort_members WHERE cohort = 'c00000001' GROUP BY state"))
    assert states == {"reported": 2}
