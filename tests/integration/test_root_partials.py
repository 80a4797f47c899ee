"""The root of a federation of sites, against Mosquitto: it takes signed partial aggregates
as it takes device updates, commits them once, and acknowledges them after the commit."""

from __future__ import annotations

import json
import queue
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from compression import CodecConfig, FrameKind, compress_dense, protocol
from compression.keys import ed25519_verifier
from compression.partial import Group, Partial, PartialAck
from coordinator.config import LimitsConfig
from coordinator.identity import fleet_key
from coordinator.strategy import StrategyConfig
from fedge_lab.broker import MosquittoBroker
from tests.conftest import wait_until
from tests.integration.conftest import FLEET, DeviceClient, ThreadedCoordinator, coordinator_config

pytestmark = pytest.mark.broker


class SiteClient(DeviceClient):
    """A site aggregator's upstream side, played by the test: it publishes partials and hears their acks."""

    def __init__(self, port: int, site: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.acks: queue.Queue[bytes] = queue.Queue()
        super().__init__(port, site)
        self.client.subscribe(protocol.site_ack(FLEET, site), qos=1)

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/ack"):
            self.acks.put(bytes(msg.payload))
        else:
            super()._on_message(c, u, msg)

    def send(self, p: Partial, signer: object | None = None) -> None:
        payload = p.encode(signer or self.key.sign)  # type: ignore[arg-type]
        self.client.publish(protocol.site_partial(FLEET, self.device), payload, qos=1).wait_for_publish(10)

    def ack(self, public: Ed25519PublicKey, partial_id: str, timeout: float = 20.0) -> PartialAck:
        verify = ed25519_verifier(public)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ack = PartialAck.decode(self.acks.get(timeout=left), verify)
            except queue.Empty:
                break
            if ack.partial_id == partial_id:
                return ack
        raise AssertionError(f"no ack of {partial_id}")


def _group(state: dict[str, np.ndarray], base: int, weight: float, ids: tuple[str, ...], rng: np.random.Generator) -> tuple[Group, dict]:
    mean = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in state.items()}
    frame = compress_dense({k: (v * weight).astype(np.float32) for k, v in mean.items()}, FrameKind.UPDATE)
    return Group(base, weight, len(ids), ids, frame), mean


def test_the_root_commits_a_partial_once_weights_its_groups_as_their_updates_and_acks_after_the_commit(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    cfg = coordinator_config(broker, tmp_path / "root", tiny_model)
    cfg = replace(
        cfg,
        limits=LimitsConfig(),
        strategy=StrategyConfig(kind="fedbuff", buffer_size=2, staleness="constant"),
        downlink=CodecConfig(topk_fraction=1.0, values="fp32"),  # the version is the exact step
    )
    site = SiteClient(broker.port, "site-a")
    root = ThreadedCoordinator(cfg)
    root.service.store.enroll("site-a", site.public_raw)
    public = fleet_key(cfg.state_dir, create=False).public_key()
    try:
        with root as service:
            meta = site.wait_meta(0)
            v0 = site.global_state(meta)
            rng = np.random.default_rng(0)
            g1, m1 = _group(v0, 0, 30.0, ("pi-1-1", "pi-2-1", "pi-3-1"), rng)
            g2, m2 = _group(v0, 0, 10.0, ("pi-4-1",), rng)
            p1 = Partial("site-a", 1, time.time(), (g1, g2))
            site.send(p1)
            assert site.ack(public, p1.partial_id).outcome == "applied"
            v1 = site.global_state(site.wait_meta(1))
            for k in v0:  # FedBuff's sample-weighted mean of the four updates the two groups cover
                np.testing.assert_allclose(v1[k] - v0[k], (30 * m1[k] + 10 * m2[k]) / 40, atol=1e-6)
            site.send(p1)  # a resend (the site missed the ack): acknowledged again, counted once
            assert site.ack(public, p1.partial_id).outcome == "duplicate"
            # Another partial covering an update that p1 covered: refused, nothing applied.
            g3, _ = _group(v0, 1, 5.0, ("pi-9-1", "pi-2-1"), rng)
            site.send(Partial("site-a", 2, time.time(), (g3,)))
            # Forged: signed by another key.
            site.send(Partial("site-a", 3, time.time(), (g3,)), Ed25519PrivateKey.generate().sign)
            # Under a site id no site can have.
            site.client.publish(f"fl/{FLEET}/sites/bad$site/partial", b"FPA1", qos=1).wait_for_publish(10)
            wait_until(lambda: service.rejections.get("duplicate", 0) + service.rejections.get("malformed", 0) >= 2, 20, "two refusals")
            wait_until(lambda: service.rejections.get("malformed_topic", 0) == 1, 20, "the bad site id's refusal")
            assert service.version == 1
            db = service.store.db
            assert sorted(r[0] for r in db.execute("SELECT update_id FROM partial_updates")) == ["pi-1-1", "pi-2-1", "pi-3-1", "pi-4-1"]
            rows = [tuple(r) for r in db.execute("SELECT update_id, device, num_samples, applied_version FROM ledger ORDER BY update_id")]
            assert rows == [(f"{p1.partial_id}/0", "site:site-a", 30, 1), (f"{p1.partial_id}/1", "site:site-a", 10, 1)]
    finally:
        site.close()


def test_the_root_records_a_sites_status_and_bridge_only_from_an_enrolled_site_and_only_when_bounded(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    cfg = coordinator_config(broker, tmp_path / "root", tiny_model)
    site = SiteClient(broker.port, "site-a")
    root = ThreadedCoordinator(cfg)
    root.service.store.enroll("site-a", site.public_raw)

    def pub(topic: str, payload: bytes) -> None:
        site.client.publish(topic, payload, qos=1).wait_for_publish(10)

    try:
        with root as service:
            site.wait_meta(0)
            status_a, bridge_a = f"fl/{FLEET}/sites/site-a/status", protocol.site_bridge(FLEET, "site-a")
            pub(status_a, json.dumps({"state": "online", "following": 0, "devices_online": 3}).encode())
            pub(bridge_a, b"1")
            pub(f"fl/{FLEET}/sites/stranger/status", b'{"state": "online"}')  # not enrolled: never recorded
            pub(protocol.site_bridge(FLEET, "stranger"), b"1")

            def row(s: str) -> tuple[object, ...] | None:
                r = service.store.db.execute("SELECT status, bridge FROM sites WHERE site=?", (s,)).fetchone()
                return None if r is None else tuple(r)

            wait_until(lambda: (r := row("site-a")) is not None and r[1] == "up" and r[0] is not None, 20, "site-a's status and bridge")
            good = row("site-a")
            # Oversized, not JSON, or not an object: ignored. The root handles messages in order, so
            # once the bridge message sent after them is recorded, they were refused.
            for payload in (b"{" + b" " * (protocol.MAX_SITE_STATUS + 1) + b"}", b"\xff\xfe not json", b"[1, 2, 3]"):
                pub(status_a, payload)
            pub(bridge_a, b"0")
            wait_until(lambda: row("site-a")[1] == "down", 20, "the bridge marker")  # type: ignore[index]
            assert good is not None and row("site-a")[0] == good[0]  # type: ignore[index]
            # A bridge state other than 0/1: ignored (the status sent after it is the marker).
            pub(bridge_a, b"maybe")
            pub(status_a, json.dumps({"state": "online", "following": 0, "devices_online": 4}).encode())
            wait_until(lambda: '"devices_online": 4' in str(row("site-a")[0]), 20, "the status marker")  # type: ignore[index]
            assert row("site-a")[1] == "down"  # type: ignore[index]
            assert row("stranger") is None
            assert service.rejections.get("handler_error", 0) == 0
    finally:
        site.close()
