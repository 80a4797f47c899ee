"""Secure aggregation against Mosquitto: the coordinator service and enrolled devices run the
rounds over the broker; the coordinator recovers exactly the sum, survives a third of the
cohort dropping, and no payload on the broker (``#``) holds an unmasked update."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from compression import protocol
from compression.keys import ed25519_verifier
from compression.mqtt import loopback, make_client
from compression.protocol import CohortInvite, DeviceStatus
from compression.secagg import pack, unpack
from compression.secagg_device import DeviceSession
from compression.secagg_wire import DOWN_KINDS, UP_KINDS, SecAggMessage, decode, unmask_down
from coordinator.cohorts import Cohort, CohortConfig
from coordinator.config import LimitsConfig
from coordinator.identity import fleet_key
from coordinator.secure import SecureCohort, SecureConfig
from coordinator.strategy import StrategyConfig
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, DeviceClient, ThreadedCoordinator, coordinator_config

pytestmark = pytest.mark.broker


_verify_with = ed25519_verifier


class SecAggDevice(DeviceClient):
    """An enrolled device that runs its side of the rounds (:class:`DeviceSession`) over MQTT."""

    def __init__(self, port: int, device: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.fleet_public: Ed25519PublicKey | None = None
        self.session: DeviceSession | None = None
        self.invites: queue.Queue[CohortInvite] = queue.Queue()
        self.silent_after_mask = False
        self.sent: list[str] = []
        self.refusals: list[str] = []
        self.lock = threading.Lock()
        super().__init__(port, device)
        self.client.subscribe([(protocol.device_invites(FLEET, device), 1), (protocol.device_secagg_inbox(FLEET, device), 1)])

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if "/invite/" in msg.topic:
            assert self.fleet_public is not None
            invite = CohortInvite.from_json(msg.payload, _verify_with(self.fleet_public))
            with self.lock:
                self.session = DeviceSession(invite)
                self._send(self.session.start())
            self.invites.put(invite)
        elif "/secagg/" in msg.topic:
            assert self.fleet_public is not None and self.session is not None
            incoming = decode(msg.payload, lambda d: _verify_with(self.fleet_public), DOWN_KINDS)  # type: ignore[arg-type]
            with self.lock:
                if self.silent_after_mask and self.session.phase == "masked":
                    return  # gone after its masked input
                self._send(self.session.handle(incoming))
        else:
            super()._on_message(c, u, msg)

    def _send(self, msg: SecAggMessage | None) -> None:
        if msg is not None:
            self.sent.append(msg.kind)
            if msg.kind == "refuse":
                self.refusals.append(str(msg.fields["why"]))
            self.client.publish(protocol.device_secagg(FLEET, self.device), msg.encode(self.key.sign), qos=1)

    def announce(self) -> None:
        payload = DeviceStatus(state="waiting", version=0, ts=time.time()).to_json()
        self.client.publish(protocol.device_status(FLEET, self.device), payload, qos=1, retain=True).wait_for_publish(10)

    def submit(self, x: np.ndarray, seed: int) -> np.ndarray:
        """Mask and send ``x``; returns the quantized values it put under the masks (what must never show)."""
        with self.lock:
            assert self.session is not None
            msg, residual = self.session.submit(x, np.random.default_rng(seed))
            idx = self.session.indices(x.size)
            sent = np.rint((x[idx] - residual[idx]) * self.session.quantizer.scale).astype(np.int64)
            self._send(msg)
        return sent


class Sniffer:
    """Every payload published on the broker, from a client subscribed to ``#``."""

    def __init__(self, port: int) -> None:
        self.payloads: list[tuple[str, bytes]] = []
        self.client = make_client(loopback(port), f"sniffer-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe("#", qos=1)
        self.client.on_message = lambda c, u, m: self.payloads.append((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _fleet(broker: MosquittoBroker, tmp_path: Path, tiny_model: Path, n: int, round_s: float):  # type: ignore[no-untyped-def]
    cfg = coordinator_config(broker, tmp_path / "coord", tiny_model)
    cfg = replace(
        cfg,
        limits=LimitsConfig(),
        strategy=StrategyConfig(kind="fedbuff", buffer_size=1),
        cohorts=CohortConfig(enabled=True, concurrency=n, size=n, deadline_s=max(60.0, 6 * round_s), fill_wait_s=0.5),
        secagg=SecureConfig(enabled=True, round_s=round_s, bits=12, fraction=0.05),
    )
    devices = [SecAggDevice(broker.port, f"sa-{i}") for i in range(n)]
    coordinator = ThreadedCoordinator(cfg)
    public = fleet_key(cfg.state_dir, create=False).public_key()
    for d in devices:
        coordinator.service.store.enroll(d.device, d.public_raw)
        d.fleet_public = public
        d.announce()
    return coordinator, devices


def _ready(devices: list[SecAggDevice]) -> bool:
    """Whether every device is through the keys and shares rounds of its current cohort."""
    return all(d.session is not None and d.session.phase == "ready" for d in devices)


def _wait_ready(devices: list[SecAggDevice], what: str) -> None:
    wait_until(lambda: _ready(devices), 30, what)


def _vector(d: SecAggDevice, seed: int) -> np.ndarray:
    state = d.global_state(d.wait_meta(0))
    size = sum(v.size for v in state.values())
    return np.random.default_rng(seed).normal(0, 0.01, size)


def test_the_coordinator_recovers_exactly_the_sum_and_the_broker_never_carries_an_unmasked_update(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    sniffer = Sniffer(broker.port)
    coordinator, devices = _fleet(broker, tmp_path, tiny_model, 6, round_s=5.0)
    try:
        with coordinator as service:
            for d in devices:
                d.invites.get(timeout=30)
            _wait_ready(devices, "the keys and shares rounds")
            xs = [_vector(d, i) for i, d in enumerate(devices)]
            sent = [d.submit(x, i) for i, (d, x) in enumerate(zip(devices, xs, strict=True))]
            devices[0].wait_meta(1, timeout=30)
            sc = service.secure.recent[-1]  # type: ignore[union-attr]
            r = sc.quantizer.ring_bits
            assert np.array_equal(sc.ring_sum, (np.sum(sent, axis=0) % (1 << r)).astype(np.uint32))
            assert sc.u3 == [1, 2, 3, 4, 5, 6] and all("reveal" in d.sent for d in devices)
            row = service.store.db.execute("SELECT device, num_samples, applied_version FROM ledger").fetchall()
            assert [tuple(x) for x in row] == [("secagg:c00000001", 6, 1)]
            states = service.store.db.execute("SELECT state FROM cohort_members WHERE cohort='c00000001'").fetchall()
            assert [s[0] for s in states] == ["reported"] * 6
            time.sleep(0.5)
    finally:
        for d in devices:
            d.close()
        sniffer.close()
    topics = {t for t, _ in sniffer.payloads}
    assert not [t for t in topics if t.endswith("/update")], "no device uploaded an update in the clear"
    assert any(t.endswith("/secagg") for t in topics) and any("/secagg/" in t for t in topics)
    everything = b"".join(p for _, p in sniffer.payloads)
    idx = sc.indices()
    for x, q in zip(xs, sent, strict=True):
        plain = [pack(q.astype(np.uint32) & np.uint32((1 << r) - 1), r)[:48], x[idx].astype(np.float32).tobytes()[:48], x.tobytes()[:48]]
        assert not any(p in everything for p in plain), "a device's input (quantized or float) appears in a payload"
    # One device's masked vector, as the broker carried it, against the uniform distribution on Z_2^r.
    fleet_keys = {d.device: d.key.public_key() for d in devices}
    ups = [
        decode(p, lambda dev: _verify_with(fleet_keys[dev]), UP_KINDS)
        for t, p in sniffer.payloads
        if t == protocol.device_secagg(FLEET, "sa-0")
    ]
    masked = next(m for m in ups if m.kind == "masked" and m.cohort == "c00000001")
    y = unpack(masked.body, r, sc.k)
    counts = np.bincount((y >> np.uint32(r - 4)).astype(np.int64), minlength=16)
    expected = y.size / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 37.7  # 15 degrees of freedom: the 99.9th percentile


def test_a_third_of_the_cohort_dropping_after_its_masked_input_is_survived(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    coordinator, devices = _fleet(broker, tmp_path, tiny_model, 6, round_s=3.0)
    try:
        with coordinator as service:
            for d in devices:
                d.invites.get(timeout=30)
            _wait_ready(devices, "the keys and shares rounds")
            for d in devices[:2]:
                d.silent_after_mask = True
            sent = [d.submit(_vector(d, i), i) for i, d in enumerate(devices)]
            devices[-1].wait_meta(1, timeout=30)
            sc = service.secure.recent[-1]  # type: ignore[union-attr]
            assert sorted(sc.reveals) == [3, 4, 5, 6] and sc.t == 4
            assert np.array_equal(sc.ring_sum, (np.sum(sent, axis=0) % (1 << sc.quantizer.ring_bits)).astype(np.uint32))
    finally:
        for d in devices:
            d.close()


def test_a_device_refuses_a_coordinator_that_asks_for_both_shares_of_one_member(tmp_path: Path, broker: MosquittoBroker) -> None:
    """The coordinator here is a deviant one the test plays: it runs the rounds honestly, then
    asks every device for both the self-mask share and the mask-key share of member 6."""
    fleet = Ed25519PrivateKey.generate()
    names = [f"sa-{i}" for i in range(6)]
    now = time.time()
    cohort = Cohort("c00000009", 9, 0, tuple(names), now, now + 600, 6)
    sc = SecureCohort(SecureConfig(round_s=30.0), cohort, 4000, b"\x01" * 32, now)
    devices = [SecAggDevice(broker.port, n) for n in names]
    keys = {d.device: d.key.public_key() for d in devices}
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    coord = make_client(loopback(broker.port), "deviant-coordinator")
    coord.on_connect = lambda c, u, f, r, p: c.subscribe(protocol.all_secagg(FLEET), qos=1)
    coord.on_message = lambda c, u, m: inbox.put((m.topic, bytes(m.payload)))
    coord.connect("127.0.0.1", broker.port)
    coord.loop_start()
    try:
        time.sleep(0.5)
        for d in devices:
            d.fleet_public = fleet.public_key()
            invite = CohortInvite(cohort.cohort, d.device, 0, cohort.deadline, now, secagg=sc.params(d.device)).signed(fleet.sign)
            coord.publish(protocol.cohort_invite(FLEET, cohort.cohort, d.device), invite.to_json(), qos=1)
        masked, submitted = 0, False
        deadline = time.monotonic() + 30
        while masked < 6 and time.monotonic() < deadline:
            if not submitted and _ready(devices):
                submitted = True
                for i, d in enumerate(devices):
                    d.submit(np.random.default_rng(i).normal(0, 0.01, 4000), i)
            try:
                topic, payload = inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            msg = decode(payload, lambda dev: _verify_with(keys[dev]), UP_KINDS)
            if msg.kind == "masked":
                masked += 1
                continue  # the deviant coordinator takes over the unmasking round itself
            for out in sc.receive(msg, time.time()):
                coord.publish(protocol.cohort_secagg(FLEET, cohort.cohort, out.device), out.encode(fleet.sign), qos=1)
        assert masked == 6
        for d in devices:
            evil = unmask_down(cohort.cohort, d.device, [1, 2, 3, 4, 5, 6], [6])
            coord.publish(protocol.cohort_secagg(FLEET, cohort.cohort, d.device), evil.encode(fleet.sign), qos=1)
        answers: list[str] = []
        deadline = time.monotonic() + 20
        while answers.count("refuse") < 6 and time.monotonic() < deadline:
            try:
                _topic, payload = inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            answers.append(decode(payload, lambda dev: _verify_with(keys[dev]), UP_KINDS).kind)
        assert answers.count("refuse") == 6 and "reveal" not in answers
        assert all("both shares" in d.refusals[0] and "reveal" not in d.sent for d in devices)
    finally:
        coord.disconnect()
        coord.loop_stop()
        for d in devices:
            d.close()


def test_enrolled_agents_train_under_secure_aggregation_behind_the_shipped_acl(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto_binary: str, tiny_model: Path, device_data
) -> None:
    """Three real agents, enrolled, with passwords and the fleet's ACL: two securely aggregated
    cohorts make two versions, and no agent ever uploads an update in the clear."""
    from coordinator.config import BrokerConfig
    from coordinator.enrolment import enroll, set_password
    from coordinator.store import Store
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from tests.integration.test_security import _acl

    state, passwd = tmp_path / "coord", tmp_path / "passwd"
    names = [f"pi-{i}" for i in range(3)]
    for name in names:
        enroll(state, name, tmp_path / name, fleet=FLEET, broker_host="127.0.0.1", broker_port=1, password_file=passwd)
    set_password(passwd, "coordinator", "coordinator-secret")
    broker = MosquittoBroker(tmp_path / "broker", anonymous=False, extra=f"password_file {passwd}\nacl_file {_acl(tmp_path)}\n").start()
    agents = []
    for i, name in enumerate(names):
        path = tmp_path / name / "agent.toml"
        snippet = path.read_text().replace("port = 1\n", f"port = {broker.port}\n")
        snippet = snippet.replace('data_dir = "/srv/fedge-data"', f'data_dir = "{device_data(i)}"')
        snippet = snippet.replace('state_dir = "/var/lib/fedge-agent"', f'state_dir = "{tmp_path / (name + "-state")}"')
        snippet = snippet.replace("[broker]", "max_rounds = 2\nheartbeat_s = 1.0\n\n[broker]")
        snippet += f'[model]\nsource = "{tiny_model}"\n[train]\nthreads = 1\nbatch_size = 4\nseq_len = 32\nlocal_steps = 2\n'
        path.write_text(snippet)
        agents.append(Agent(load_config(path)))
    cfg = coordinator_config(broker, state, tiny_model)
    cfg = replace(
        cfg,
        broker=BrokerConfig(port=broker.port, username="coordinator", password="coordinator-secret"),
        limits=LimitsConfig(),
        strategy=StrategyConfig(kind="fedbuff", buffer_size=1),
        cohorts=CohortConfig(enabled=True, concurrency=3, size=3, deadline_s=90.0, fill_wait_s=1.0),
        secagg=SecureConfig(enabled=True, round_s=10.0),
    )
    try:
        with ThreadedCoordinator(cfg) as service:
            threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
            for t in threads:
                t.start()
            wait_until(lambda: service.version >= 2, 150, "two versions from securely aggregated cohorts")
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
    finally:
        for a in agents:
            a.stop()
        broker.stop()
    store = Store(state, readonly=True)
    ledger = [tuple(r) for r in store.db.execute("SELECT device, num_samples FROM ledger ORDER BY applied_version")]
    assert ledger == [("secagg:c00000001", 3), ("secagg:c00000002", 3)]
    assert store.rejection_counts() == {}
    assert all(a.secure.cohorts == 2 and a.state.pending() == [] for a in agents)


def test_a_coordinator_killed_with_9_mid_protocol_abandons_the_cohort_and_the_next_one_completes(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    """Killed while its first cohort waits for the members' masked inputs, the coordinator
    restarts, records that cohort ``abandoned`` (its rounds were in memory), never applies any
    of it, and runs the next cohort to the end with the same devices."""
    import signal
    import sqlite3

    from coordinator.store import Store
    from fedge_lab.demo import serve_argv
    from fedge_lab.processes import Child
    from tests.integration.conftest import coordinator_toml

    state = tmp_path / "state"
    devices = [SecAggDevice(broker.port, f"sa-{i}") for i in range(4)]
    store = Store(state, create=True)
    for d in devices:
        store.enroll(d.device, d.public_raw)
    store.close()
    public = fleet_key(state, create=True).public_key()
    for d in devices:
        d.fleet_public = public
        d.announce()
    cfg_path = coordinator_toml(
        tmp_path / "coordinator.toml",
        broker,
        tiny_model,
        limits={},
        strategy={"kind": "fedbuff", "buffer_size": 1},
        cohorts={"enabled": True, "concurrency": 4, "size": 4, "deadline_s": 60.0, "fill_wait_s": 0.5},
        secagg={"enabled": True, "round_s": 5.0},
    )
    child = Child("coordinator", serve_argv(cfg_path), tmp_path / "coord.log").start()
    try:
        for d in devices:
            assert d.invites.get(timeout=60).cohort == "c00000001"
        _wait_ready(devices, "the keys and shares rounds")
        for i, d in enumerate(devices[:2]):
            d.submit(_vector(d, i), i)  # two masked inputs reach the coordinator, then it dies
        time.sleep(0.5)
        assert child.proc is not None
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
        child = Child("coordinator", serve_argv(cfg_path), tmp_path / "coord.log").start()
        for d in devices:
            assert d.invites.get(timeout=60).cohort == "c00000002"  # the abandoned cohort is not sent again
        _wait_ready(devices, "the second cohort's keys")
        for i, d in enumerate(devices):
            d.submit(_vector(d, 10 + i), 10 + i)
        devices[0].wait_meta(1, timeout=60)
    finally:
        child.stop()
        for d in devices:
            d.close()
    db = sqlite3.connect(f"file:{state / 'coordinator.db'}?mode=ro", uri=True)
    states = dict(db.execute("SELECT cohort || ':' || state, COUNT(*) FROM cohort_members WHERE cohort <= 'c00000002' GROUP BY 1"))
    assert states == {"c00000001:abandoned": 4, "c00000002:reported": 4}
    assert [tuple(r) for r in db.execute("SELECT device, applied_version FROM ledger")] == [("secagg:c00000002", 1)]
