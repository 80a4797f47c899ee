"""A coordinator in site mode against Mosquitto, with the test playing its root: it follows only
versions the root's key signed, forwards exact signed partials, resends them until a genuine
ack, and refuses updates as ``backlog`` when the root cannot be reached and its buffer is full."""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compression import FrameKind, compress_dense, decode_frame, protocol, state_digest
from compression.keys import ed25519_verifier
from compression.mqtt import loopback, make_client
from compression.partial import Partial, PartialAck, decode
from compression.protocol import GlobalMeta, UpdateAck
from coordinator.config import CoordinatorConfig
from coordinator.errors import ConfigError
from coordinator.identity import new_key, public_hex, write_private
from coordinator.privacy import DPConfig
from coordinator.service import CoordinatorService
from coordinator.site import SiteConfig
from coordinator.strategy import StrategyConfig
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, DeviceClient, ThreadedCoordinator, coordinator_config

pytestmark = pytest.mark.broker

SITE = "site-x"


class Root:
    """The root's side, played by the test: it publishes signed versions and hears and acks partials."""

    def __init__(self, port: int) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.partials: queue.Queue[bytes] = queue.Queue()
        self.client = make_client(loopback(port), "root-played-by-test")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(protocol.site_partial(FLEET, SITE), qos=1)
        self.client.on_message = lambda c, u, m: self.partials.put(bytes(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @property
    def public(self) -> str:
        return public_hex(self.key)

    def publish_version(self, version: int, state: dict[str, np.ndarray], spec: dict, signer: object | None = None) -> None:
        snapshot = compress_dense(state, FrameKind.SNAPSHOT)
        meta = GlobalMeta(version, hashlib.sha256(snapshot).hexdigest(), len(snapshot), time.time(), state_digest(state), model=spec)
        self.client.publish(protocol.global_snapshot(FLEET), snapshot, qos=1, retain=True).wait_for_publish(10)
        signed = meta.signed(signer or self.key.sign)  # type: ignore[arg-type]
        self.client.publish(protocol.global_meta(FLEET), signed.to_json(), qos=1, retain=True).wait_for_publish(10)

    def next_partial(self, verify: object, timeout: float = 20.0) -> tuple[Partial, bytes]:
        payload = self.partials.get(timeout=timeout)
        return decode(payload, lambda _site: verify), payload  # type: ignore[arg-type,return-value]

    def ack(self, partial_id: str, version: int, signer: object | None = None) -> None:
        payload = PartialAck(SITE, partial_id, "applied", version).encode(signer or self.key.sign)  # type: ignore[arg-type]
        self.client.publish(protocol.site_ack(FLEET, SITE), payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _site_cfg(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, root: Root, **site: object) -> tuple[CoordinatorConfig, str]:
    pem, public = new_key()
    key = tmp_path / "site.key"
    write_private(key, pem)
    cfg = coordinator_config(broker, tmp_path / "site", tiny_model)
    options = {"partial_every_s": 0.5, "resend_s": 2.0, **site}
    return replace(cfg, site=SiteConfig(id=SITE, root_public_key=root.public, signing_key=str(key), **options)), public.hex()  # type: ignore[arg-type]


class Acks:
    """A device's acks, as it hears them (verified with the site's key)."""

    def __init__(self, port: int, device: str, site_public: str) -> None:
        self.verify = ed25519_verifier(bytes.fromhex(site_public))
        self.got: queue.Queue[UpdateAck] = queue.Queue()
        self.client = make_client(loopback(port), f"{device}-acks")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(protocol.device_ack(FLEET, device), qos=1)
        self.client.on_message = self._on
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if m.payload:
            self.got.put(UpdateAck.from_json(m.payload, self.verify))

    def wait(self, seq: int, timeout: float = 20.0) -> UpdateAck:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ack = self.got.get(timeout=left)
            if ack.seq == seq:
                return ack
        raise AssertionError(f"no ack of seq {seq}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_site_follows_the_root_forwards_an_exact_signed_partial_and_resends_it_until_a_genuine_ack(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    root = Root(broker.port)
    cfg, site_public = _site_cfg(tmp_path, broker, tiny_model, root)
    device = DeviceClient(broker.port, "dev-1")
    try:
        with ThreadedCoordinator(cfg) as svc:
            v0 = {k: v + np.float32(0.5) for k, v in svc.state.items()}  # the root's v0 is not the site's own
            # A version signed by another key is never followed.
            root.publish_version(3, v0, svc.spec.to_dict(), signer=Ed25519PrivateKey.generate().sign)
            time.sleep(1.5)
            assert svc.version == 0 and svc.site is not None and svc.site.problems >= 1
            root.publish_version(3, v0, svc.spec.to_dict())
            wait_until(lambda: svc.version == 3, 20, "the site to follow the root's v3")
            assert all(np.array_equal(svc.state[k], v0[k]) for k in v0)
            meta = device.wait_meta(3)
            payloads = [device.update_payload(meta, scale=0.01 * (i + 1)) for i in range(3)]
            for p in payloads:
                device.publish(p)
            verify = ed25519_verifier(bytes.fromhex(site_public))
            partial, raw = root.next_partial(verify)
            while partial.updates < 3:  # the three may straddle two partials
                more, _ = root.next_partial(verify)
                partial = Partial(partial.site, more.seq, more.created, partial.groups + more.groups)
            assert {g.base_version for g in partial.groups} == {3}
            total = {k: np.zeros_like(v) for k, v in v0.items()}
            for g in partial.groups:
                for k, v in decode_frame(g.frame).dense().items():
                    total[k] += v
            # The weighted sum: each update's delta times its 4 samples; weights add up to 12.
            assert sum(g.weight for g in partial.groups) == 12.0
            for v in total.values():
                np.testing.assert_allclose(v, np.full_like(v, 4 * (0.01 + 0.02 + 0.03)), rtol=1e-5)
            # No ack: the same bytes again, after resend_s.
            first = decode(raw, lambda _s: verify)
            again = root.partials.get(timeout=10)
            while decode(again, lambda _s: verify).seq != first.seq:
                again = root.partials.get(timeout=10)
            assert again == raw
            # A forged ack changes nothing; the root's ack stops the resends.
            problems_before = svc.site.problems + 1  # the forged ack below is counted as a problem
            root.ack(first.partial_id, 4, signer=Ed25519PrivateKey.generate().sign)
            time.sleep(1.0)
            assert first.seq in svc.site.sent
            for seq in list(svc.site.sent):
                root.ack(f"{SITE}-{seq:012d}", 4)
            wait_until(lambda: not svc.site.sent, 10, "every partial acknowledged")
            root.ack(first.partial_id, 4)  # a replayed ack of a partial already acknowledged changes nothing
            time.sleep(1.0)
            assert not svc.site.sent and svc.site.problems == problems_before
            status = svc.site.status()
            assert status["partials_unacked"] == 0 and status["following"] == 3 and status["root_version"] == 4
            ledger = {r[0]: r[1] for r in svc.store.db.execute("SELECT update_id, applied_version FROM ledger")}
            assert len(ledger) == 3 and set(ledger.values()) == {3}
            assert svc.store.db.execute("SELECT COUNT(*) FROM site_partials WHERE payload IS NOT NULL").fetchone()[0] == 0
    finally:
        device.close()
        root.close()


def test_a_site_that_cannot_reach_its_root_refuses_updates_as_backlog_once_its_buffer_is_full(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    root = Root(broker.port)
    cfg, site_public = _site_cfg(tmp_path, broker, tiny_model, root, max_unacked=1, partial_max_updates=2, resend_s=60.0)
    device = DeviceClient(broker.port, "dev-2")
    acks = Acks(broker.port, "dev-2", site_public)
    try:
        with ThreadedCoordinator(cfg) as svc:
            root.publish_version(0, dict(svc.state), svc.spec.to_dict())
            meta = device.wait_meta(0)
            wait_until(lambda: svc.site is not None and svc.site.follower.version == 0, 20, "the site to follow v0")
            for _ in range(2):
                device.publish(device.update_payload(meta))
            assert acks.wait(2).outcome == "buffered"
            wait_until(lambda: len(svc.site.sent) == 1, 10, "one partial forwarded and never acked")  # type: ignore[union-attr]
            for _ in range(2):
                device.publish(device.update_payload(meta))
            assert acks.wait(4).outcome == "buffered"
            device.publish(device.update_payload(meta))
            refused = acks.wait(5)
            assert refused.outcome == "rejected" and (refused.reason or "").startswith("backlog:")
            assert svc.rejections.get("backlog") == 1
            status = json.loads(svc.store.db.execute("SELECT value FROM meta WHERE key='site_followed'").fetchone()[0])
            assert status["version"] == 0
    finally:
        acks.close()
        device.close()
        root.close()


def test_a_storage_fault_while_a_site_takes_a_root_version_is_retried_and_the_site_still_reaches_it(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    root = Root(broker.port)
    cfg, _ = _site_cfg(tmp_path, broker, tiny_model, root)
    try:
        with ThreadedCoordinator(cfg) as svc:
            real, faults = svc.store.commit_version, []

            def flaky(*args: object, **kwargs: object) -> None:
                if not faults:  # the first write of the followed version hits a full disk
                    faults.append(1)
                    raise sqlite3.OperationalError("database or disk is full (injected)")
                real(*args, **kwargs)  # type: ignore[arg-type]

            svc.store.commit_version = flaky  # type: ignore[method-assign]
            v2 = {k: v + np.float32(0.25) for k, v in svc.state.items()}
            root.publish_version(2, v2, svc.spec.to_dict())
            wait_until(lambda: svc.version == 2, 30, "the site to reach v2 after the batch's retry")
            assert faults == [1] and all(np.array_equal(svc.state[k], v2[k]) for k in v2)
            followed = json.loads(svc.store.get_meta("site_followed") or "null")
            assert followed["version"] == 2 and svc.store.current_version() == 2
    finally:
        root.close()


def test_site_mode_refuses_configs_it_cannot_serve(tmp_path: Path) -> None:
    key = "ab" * 32
    with pytest.raises(ConfigError, match="root_public_key"):
        SiteConfig(id=SITE, root_public_key="nothex", signing_key="k")
    with pytest.raises(ConfigError, match="signing_key"):
        SiteConfig(id=SITE, root_public_key=key)
    with pytest.raises(ConfigError, match="site.id"):
        SiteConfig(id="bad/id", root_public_key=key, signing_key="k")
    site = SiteConfig(id=SITE, root_public_key=key, signing_key="k")
    with pytest.raises(ConfigError, match="site forwards sums"):
        CoordinatorConfig(state_dir=str(tmp_path), site=site, strategy=StrategyConfig(kind="fedbuff"), dp=DPConfig(enabled=True))
    missing = CoordinatorConfig(state_dir=str(tmp_path / "s"), site=replace(site, signing_key=str(tmp_path / "none.key")))
    with pytest.raises(ConfigError, match="cannot load"):
        CoordinatorService(missing, init=True)
