"""Trust against a real Mosquitto with the shipped ACL: topic isolation, signatures, replay, revocation, TLS."""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization

from compression import CodecConfig, compress_update, decode_frame, protocol
from compression.mqtt import loopback, make_client
from compression.protocol import GlobalMeta, UpdateHeader
from coordinator.config import BrokerConfig, LimitsConfig
from coordinator.enrolment import enroll, ensure_ca, issue_cert, revoke, set_password
from coordinator.store import Store
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, ThreadedCoordinator, coordinator_config

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]


def _acl(tmp_path: Path) -> Path:
    """The fleet's ACL as `fedge-coordinator acl` renders it (the shipped file is its render for 'home')."""
    from coordinator.broker_acl import render_acl

    path = tmp_path / "acl"
    path.write_text(render_acl(FLEET))
    return path


def test_the_shipped_acl_is_the_render_for_its_fleet() -> None:
    from coordinator.broker_acl import render_acl

    assert (ROOT / "devices" / "mosquitto" / "acl").read_text() == render_acl("home")


class Device:
    """A device-side client with a password login, its enrolled key, and PUBACK reason codes."""

    def __init__(self, port: int, device: str, password: str, key_pem: bytes | None) -> None:
        self.device = device
        self.key = serialization.load_pem_private_key(key_pem, password=None) if key_pem else None
        self.acks: dict[int, int] = {}
        self.metas: list[GlobalMeta] = []
        self.snapshots: dict[str, bytes] = {}
        self.cond = threading.Condition()
        client_id = f"{device}-{uuid.uuid4().hex[:6]}"
        self.client = make_client(loopback(port, username=device, password=password), client_id)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe([(protocol.global_meta(FLEET), 1), (protocol.global_snapshot(FLEET), 1)])
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/meta"):
            self.metas.append(GlobalMeta.from_json(msg.payload))
        else:
            self.snapshots[hashlib.sha256(msg.payload).hexdigest()] = bytes(msg.payload)

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, reason: object, props: object) -> None:
        with self.cond:
            self.acks[mid] = int(getattr(reason, "value", 0))
            self.cond.notify_all()

    def latest(self) -> GlobalMeta:
        wait_until(lambda: self.metas and self.metas[-1].snapshot_sha256 in self.snapshots, 30, "the global model")
        return self.metas[-1]

    def payload(self, *, seq: int | None = None, signed: bool = True, base: int | None = None) -> bytes:
        meta = self.latest()
        state = decode_frame(self.snapshots[meta.snapshot_sha256]).dense()
        frame = compress_update({k: np.full_like(v, 0.01) for k, v in state.items()}, CodecConfig(topk_fraction=1.0, values="fp32")).frame
        if seq is None:
            self.seq += 1
            seq = self.seq
        header = UpdateHeader(
            device=self.device,
            seq=seq,
            update_id=f"{self.device}-{seq}-{uuid.uuid4().hex[:6]}",
            base_version=meta.version if base is None else base,
            num_samples=4,
            timestamp=time.time(),
            frame_sha256=hashlib.sha256(frame).hexdigest(),
        )
        return protocol.encode_envelope(header, frame, signer=self.key.sign if (signed and self.key) else None)  # type: ignore[union-attr]

    def publish(self, payload: bytes, device: str | None = None) -> int:
        """Publish to ``device``'s update topic (default: own); returns the PUBACK reason code."""
        info = self.client.publish(protocol.device_update(FLEET, device or self.device), payload, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, 10), "no PUBACK"
            return self.acks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _rejections(state: Path) -> dict[str, int]:
    return Store(state, readonly=True).rejection_counts()


def test_acl_signatures_replay_tamper_and_revocation(tmp_path: Path, mosquitto_binary: str, tiny_model: Path) -> None:
    state, passwd = tmp_path / "coord", tmp_path / "passwd"
    keys = {}
    for device in ("dev-a", "dev-b"):
        enroll(state, device, tmp_path / device, fleet=FLEET, broker_host="127.0.0.1", broker_port=1883, password_file=passwd)
        snippet = (tmp_path / device / "agent.toml").read_text()
        password = snippet.split('password = "')[1].split('"')[0]
        keys[device] = ((tmp_path / device / f"{device}.key").read_bytes(), password)
    set_password(passwd, "coordinator", "coordinator-secret")
    broker = MosquittoBroker(tmp_path / "broker", anonymous=False, extra=f"password_file {passwd}\nacl_file {_acl(tmp_path)}\n").start()
    cfg = coordinator_config(broker, state, tiny_model)
    cfg = replace(
        cfg,
        broker=BrokerConfig(port=broker.port, username="coordinator", password="coordinator-secret"),
        limits=LimitsConfig(allow_unknown_devices=False, require_signatures=True),
    )
    a = b = None
    try:
        with ThreadedCoordinator(cfg) as service:
            a = Device(broker.port, "dev-a", keys["dev-a"][1], keys["dev-a"][0])
            b = Device(broker.port, "dev-b", keys["dev-b"][1], keys["dev-b"][0])
            # 1. Publishing under another device's topic: refused by the broker (MQTT v5 reason code 135).
            assert a.publish(a.payload(), device="dev-b") == 135
            # 2. A signed update on its own topic is applied.
            good = a.payload()
            assert a.publish(good) == 0
            wait_until(lambda: service.version == 1, 20, "version 1")
            # 3. The same message again (a QoS redelivery or a capture): dropped as a duplicate.
            assert a.publish(good) == 0
            # 4. A validly signed update whose sequence number is not above the last: a replay.
            assert a.publish(a.payload(seq=1)) == 0
            wait_until(lambda: _rejections(state).get("replayed") == 1, 10, "the replay's rejection")
            # 5. Tampering with the signed header (here the sample count) breaks the signature.
            tampered = a.payload()
            head_len = int.from_bytes(tampered[4:8], "little")
            head = json.loads(tampered[8 : 8 + head_len])
            head["num_samples"] = 4000
            new_head = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
            forged = tampered[:4] + len(new_head).to_bytes(4, "little") + new_head + tampered[8 + head_len :]
            assert a.publish(forged) == 0
            wait_until(lambda: _rejections(state).get("bad_signature") == 1, 10, "the forgery's rejection")
            # 6. An unsigned update from an enrolled device.
            assert a.publish(a.payload(signed=False)) == 0
            wait_until(lambda: _rejections(state).get("unsigned") == 1, 10, "the unsigned update's rejection")
            # 7. dev-b signs with its own key; revoked, its next update is refused.
            assert b.publish(b.payload()) == 0
            wait_until(lambda: service.version == 2, 20, "version 2")
            revoke(state, "dev-b")
            assert b.publish(b.payload()) == 0
            wait_until(lambda: _rejections(state).get("revoked") == 1, 10, "the revoked device's rejection")
            time.sleep(0.5)
            assert service.version == 2
    finally:
        for d in (a, b):
            if d is not None:
                d.close()
        broker.stop()
    ledger = list(Store(state, readonly=True).ledger())
    assert [(e["device"], e["seq"]) for e in ledger] == [("dev-a", 2), ("dev-b", 1)]  # dev-a's seq 1 never passed the ACL
    assert _rejections(state) == {"replayed": 1, "bad_signature": 1, "unsigned": 1, "revoked": 1}


def test_tls_needs_the_fleet_ca_and_maps_the_certificate_to_the_user(tmp_path: Path, mosquitto_binary: str) -> None:
    ca = tmp_path / "ca"
    ensure_ca(ca)
    issue_cert(ca, "localhost", tmp_path / "server.key", tmp_path / "server.crt", server=True)
    issue_cert(ca, "dev-a", tmp_path / "dev-a.key", tmp_path / "dev-a.crt")
    tls = (
        f"cafile {ca / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\n"
        f"require_certificate true\nuse_identity_as_username true\nacl_file {_acl(tmp_path)}\n"
    )
    broker = MosquittoBroker(tmp_path / "broker", anonymous=False, extra=tls).start()
    try:
        # Without the fleet CA the server certificate does not verify.
        plain = make_client(loopback(broker.port, tls=True), "no-ca")
        with pytest.raises(ssl.SSLError):
            plain.connect("127.0.0.1", broker.port)
        # With the CA and the device's certificate: connected, as user dev-a, bound by the ACL.
        acks: dict[int, int] = {}
        connected = threading.Event()
        tls = {"tls": True, "cafile": str(ca / "ca.crt"), "certfile": str(tmp_path / "dev-a.crt"), "keyfile": str(tmp_path / "dev-a.key")}
        dev = make_client(loopback(broker.port, **tls), "dev-a")
        dev.on_connect = lambda c, u, f, r, p: connected.set() if not r.is_failure else None
        dev.on_publish = lambda c, u, mid, r, p: acks.__setitem__(mid, int(r.value))
        dev.connect("127.0.0.1", broker.port)
        dev.loop_start()
        try:
            assert connected.wait(10)
            own = dev.publish(protocol.device_status(FLEET, "dev-a"), b"{}", qos=1)
            other = dev.publish(protocol.device_status(FLEET, "dev-b"), b"{}", qos=1)
            wait_until(lambda: own.mid in acks and other.mid in acks, 10, "both PUBACKs")
            # 16 is "no matching subscribers", a success; 135 is "not authorized".
            assert acks[own.mid] < 0x80 and acks[other.mid] == 135
        finally:
            dev.disconnect()
            dev.loop_stop()
    finally:
        broker.stop()


def test_an_enrolled_agent_signs_its_updates(tmp_path: Path, mosquitto_binary: str, tiny_model: Path, device_data) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    state, passwd = tmp_path / "coord", tmp_path / "passwd"
    enroll(state, "pi-signed", tmp_path / "pi-signed", fleet=FLEET, broker_host="127.0.0.1", broker_port=1, password_file=passwd)
    set_password(passwd, "coordinator", "coordinator-secret")
    broker = MosquittoBroker(tmp_path / "broker", anonymous=False, extra=f"password_file {passwd}\nacl_file {_acl(tmp_path)}\n").start()
    # The enrolment snippet, completed with this machine's paths and the test broker's port.
    snippet = (tmp_path / "pi-signed" / "agent.toml").read_text()
    snippet = snippet.replace("port = 1\n", f"port = {broker.port}\n")
    snippet = snippet.replace('data_dir = "/srv/fedge-data"', f'data_dir = "{device_data(0)}"')
    snippet = snippet.replace('state_dir = "/var/lib/fedge-agent"', f'state_dir = "{tmp_path / "agent-state"}"')
    snippet = snippet.replace("[broker]", "max_rounds = 2\nsync_wait_s = 2.0\n\n[broker]")
    snippet += f'[model]\nsource = "{tiny_model}"\n[train]\nthreads = 1\nbatch_size = 4\nseq_len = 32\nlocal_steps = 2\n'
    (tmp_path / "pi-signed" / "agent.toml").write_text(snippet)
    cfg = coordinator_config(broker, state, tiny_model)
    cfg = replace(
        cfg,
        broker=BrokerConfig(port=broker.port, username="coordinator", password="coordinator-secret"),
        limits=LimitsConfig(allow_unknown_devices=False, require_signatures=True),
    )
    try:
        with ThreadedCoordinator(cfg) as service:
            agent = Agent(load_config(tmp_path / "pi-signed" / "agent.toml"))
            thread = threading.Thread(target=agent.run, daemon=True)
            thread.start()
            thread.join(180)
            assert not thread.is_alive()
            wait_until(lambda: service.version >= 2, 20, "two signed updates applied")
    finally:
        broker.stop()
    assert _rejections(state) == {}
    assert Store(state, readonly=True).identity("pi-signed")["last_seq"] == 2  # type: ignore[index]


def test_each_device_reads_only_its_own_invitations_and_secagg_messages_and_none_can_send_them(
    tmp_path: Path, mosquitto_binary: str
) -> None:
    passwd = tmp_path / "passwd"
    for user in ("coordinator", "dev-a", "dev-b"):
        set_password(passwd, user, f"{user}-secret")
    broker = MosquittoBroker(tmp_path / "broker", anonymous=False, extra=f"password_file {passwd}\nacl_file {_acl(tmp_path)}\n").start()
    got: dict[str, list[str]] = {"dev-a": [], "dev-b": []}
    clients = {}
    try:
        for user in ("dev-a", "dev-b"):
            c = make_client(loopback(broker.port, username=user, password=f"{user}-secret"), f"{user}-{uuid.uuid4().hex[:6]}")
            # dev-b also tries every invitation of the fleet, and dev-a's in particular.
            filters = [protocol.device_invites(FLEET, user), protocol.device_secagg_inbox(FLEET, user)]
            if user == "dev-b":
                filters += [f"fl/{FLEET}/cohorts/#", protocol.device_invites(FLEET, "dev-a"), protocol.device_secagg_inbox(FLEET, "dev-a")]
                filters += [protocol.all_secagg(FLEET)]
            c.on_connect = lambda cl, u, f, r, p, filters=filters: cl.subscribe([(t, 1) for t in filters])
            c.on_message = lambda cl, u, m, user=user: got[user].append(m.topic)
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            clients[user] = c
        coord = make_client(loopback(broker.port, username="coordinator", password="coordinator-secret"), "coordinator-acl")
        coord.connect("127.0.0.1", broker.port)
        coord.loop_start()
        clients["coordinator"] = coord
        time.sleep(0.5)
        coord.publish(protocol.cohort_invite(FLEET, "c00000001", "dev-a"), b"{}", qos=1).wait_for_publish(10)
        coord.publish(protocol.cohort_secagg(FLEET, "c00000001", "dev-a"), b"FSA1", qos=1).wait_for_publish(10)
        # A device cannot invite anyone, speak for the coordinator in a cohort's rounds, or for
        # another device (the broker refuses each publish: reason code 135).
        refused: list[int] = []
        clients["dev-b"].on_publish = lambda cl, u, mid, reason, props: refused.append(int(getattr(reason, "value", 0)))
        clients["dev-b"].publish(protocol.cohort_invite(FLEET, "c00000002", "dev-a"), b"{}", qos=1).wait_for_publish(10)
        clients["dev-b"].publish(protocol.cohort_secagg(FLEET, "c00000001", "dev-a"), b"FSA1", qos=1).wait_for_publish(10)
        clients["dev-b"].publish(protocol.device_secagg(FLEET, "dev-a"), b"FSA1", qos=1).wait_for_publish(10)
        wait_until(lambda: len(got["dev-a"]) >= 2 and len(refused) >= 3, 10, "dev-a's messages and dev-b's refusals")
        time.sleep(0.5)
    finally:
        for c in clients.values():
            c.disconnect()
            c.loop_stop()
        broker.stop()
    assert sorted(got["dev-a"]) == sorted(
        [protocol.cohort_invite(FLEET, "c00000001", "dev-a"), protocol.cohort_secagg(FLEET, "c00000001", "dev-a")]
    )
    assert got["dev-b"] == []
    assert refused == [135, 135, 135]
