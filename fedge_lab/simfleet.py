"""Simulated devices for fleet-scale tests: real MQTT clients and real frames, cheap training.

One process hosts many devices. Each device has its own MQTT v5 connection, client id,
retained status with a Last Will, command topic and per-device sequence numbers, and it
sends real signed-format update envelopes with default-codec frames (top-k, int4, zstd,
its own error-feedback residual). Only training is replaced: by a few noisy gradient
steps of :mod:`fedge_lab.objective`, plus a sleep of ``step_s x speed`` that
stands for the device's compute time (speed tiers such as 1x, 3x, 10x slower).

Every connection is driven by one selector loop (paho's external-loop API), so a thousand
devices cost one thread. The process follows the global versions with one shared
:class:`~fedge_lab.mirror.GlobalMirror` subscription instead of a thousand
identical downloads; each device starts a round from the version current at that moment,
and, like the real agent, waits after sending for the next version (``sync_wait_s``).

Run it as ``python -m fedge_lab.simfleet PLAN.json``; it writes one JSON line per
update the broker acknowledged to ``PLAN.log`` and a summary JSON to ``PLAN.summary`` when
it stops (at ``end_at``, or on SIGTERM, after waiting up to 5 s for the last acknowledgements).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import selectors
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from compression import CodecError, ErrorFeedback, compress_update, decode_frame, protocol
from compression.invitations import Invitations
from compression.protocol import CohortInvite, DeviceStatus, UpdateHeader
from fedge_lab.fleet_plan import FleetPlan, SimDevice
from fedge_lab.mirror import GlobalMirror
from fedge_lab.objective import SimObjective
from fedge_lab.simclient import SimClient

log = logging.getLogger(__name__)

MISC_EVERY_S = 1.0


class _Device:
    def __init__(self, fleet: SimFleet, spec: SimDevice) -> None:
        self.fleet = fleet
        self.spec = spec
        self.domain = fleet.objective.domain_of(spec.index)
        self.rng = np.random.default_rng([fleet.plan.seed, spec.index])
        self.feedback = ErrorFeedback()
        # Sequence numbers stay monotonic across restarts of this process: start from the clock.
        self.seq = time.time_ns() // 1000
        self.client = SimClient(fleet, spec.id, self)
        self.invitations = Invitations(spec.id)
        self.state = "starting"
        self.base: int | None = None
        self.waiting = False
        self.paused = False
        self.down_until = 0.0
        self.round_token = 0
        self.rounds = 0
        self.bytes_up = 0
        self.dense_bytes_up = 0

    def status_payload(self, state: str | None = None) -> bytes:
        metrics = {"rounds": float(self.rounds), "bytes_up": float(self.bytes_up), "speed": self.spec.speed}
        loss = None if self.fleet.mirror.version is None else self.fleet.version_loss
        if loss is not None:
            metrics["eval_loss"] = loss
        return DeviceStatus(
            state=state or self.state,
            version=self.fleet.mirror.version,
            ts=time.time(),
            profile=f"sim-{self.spec.speed:g}x",
            metrics=metrics,
        ).to_json()

    def on_connected(self) -> None:
        self.publish_status()
        if not self.waiting and self.state in ("starting", "waiting", "idle"):
            self.fleet.at(max(time.time(), self.fleet.plan.start_at), self.start_round)

    def publish_status(self) -> None:
        if self.client.connected:
            self.client.mqtt.publish(protocol.device_status(self.fleet.plan.fleet, self.spec.id), self.status_payload(), qos=1, retain=True)

    def set_state(self, state: str, publish: bool = False) -> None:
        """Round-by-round states go out with the next heartbeat only: a thousand devices
        publishing every transition would load the coordinator with status traffic."""
        if state != self.state:
            self.state = state
            if publish:
                self.publish_status()

    def on_command(self, payload: bytes) -> None:
        try:
            cmd = protocol.decode_command(payload)
        except CodecError as exc:
            log.warning("%s: bad command ignored: %s", self.spec.id, exc)
            return
        self.paused = cmd == "pause"
        if self.paused:
            self.round_token += 1  # abandons a round in progress
            self.set_state("paused", publish=True)
        else:
            self.set_state("waiting", publish=True)
            self.fleet.at(time.time(), self.start_round)

    def on_invite(self, payload: bytes) -> None:
        try:
            ignored = self.invitations.offer(CohortInvite.from_json(payload), time.monotonic(), time.time())
        except CodecError as exc:
            log.warning("%s: bad invitation ignored: %s", self.spec.id, exc)
            return
        if ignored:
            log.debug("%s: %s", self.spec.id, ignored)
        elif self.state != "training":
            self.fleet.at(time.time(), self.start_round)

    def _uninvited(self) -> bool:
        """The fleet trains in cohorts and this device holds no invitation it can act on now."""
        meta = self.fleet.mirror.follower.meta
        if meta is None or not meta.cohorts:
            return False
        invite = self.invitations.current(time.monotonic())
        return invite is None or (self.fleet.mirror.version or 0) < invite.version

    def start_round(self) -> None:
        f = self.fleet
        now = time.time()
        if f.stopping or self.paused or self.down_until > now or not self.client.connected:
            return
        if f.mirror.version is None or self._uninvited():
            self.waiting = True
            # In cohorts, the coordinator invites the devices whose status says they wait: say it now.
            self.set_state("waiting", publish=f.mirror.version is not None)
            return
        self.waiting = False
        self.base = f.mirror.version
        self.round_token += 1
        token = self.round_token
        duration = f.plan.step_s * self.spec.speed * float(self.rng.uniform(0.8, 1.2))
        self.set_state("training")
        f.at(now + duration, lambda: self.finish_round(token))

    def finish_round(self, token: int) -> None:
        f = self.fleet
        if token != self.round_token or f.stopping or self.paused or self.base is None:
            return
        state = f.versions.get(self.base)
        if state is None:  # the base version fell out of the cache: start over from the current one
            self.start_round()
            return
        delta = f.objective.local_update(state, self.domain, self.rng)
        compressed = compress_update(delta, f.plan.codec, self.feedback)
        self.feedback = compressed.feedback
        self.seq += 1
        meta = f.mirror.follower.meta
        cohort = self.invitations.used() if meta is not None and meta.cohorts else ""
        header = UpdateHeader(
            device=self.spec.id,
            seq=self.seq,
            update_id=f"{self.spec.id}-{self.seq}",
            base_version=self.base,
            num_samples=32,
            timestamp=time.time(),
            frame_sha256=hashlib.sha256(compressed.frame).hexdigest(),
            train_loss=f.objective.domain_loss(state, self.domain),
            cohort=cohort,
        )
        envelope = protocol.encode_envelope(header, compressed.frame)
        info = self.client.mqtt.publish(protocol.device_update(f.plan.fleet, self.spec.id), envelope, qos=1)
        self.rounds += 1
        self.bytes_up += len(envelope)
        self.dense_bytes_up += compressed.dense_fp32_bytes
        f.record(self, info.mid, len(envelope), compressed.dense_fp32_bytes)
        self.set_state("idle")
        if f.mirror.version != self.base:
            self.start_round()  # a newer version came while training: start from it at once
            return
        # Like the agent: wait for the version that includes this update, at most sync_wait_s.
        self.waiting = True
        waited_token = self.round_token
        f.at(time.time() + f.plan.sync_wait_s, lambda: self._wait_expired(waited_token))

    def _wait_expired(self, token: int) -> None:
        if self.waiting and token == self.round_token:
            self.start_round()

    def on_new_version(self) -> None:
        if self.waiting:
            self.start_round()

    def drop(self, down_s: float) -> None:
        self.round_token += 1
        self.waiting = False
        self.state = "starting"
        self.down_until = time.time() + down_s
        self.client.drop()
        self.fleet.counts["drops"] += 1
        self.fleet.at(self.down_until, self.client.connect_again)


class SimFleet:
    def __init__(self, plan: FleetPlan) -> None:
        self.plan = plan
        self.sel = selectors.DefaultSelector()
        self.rng = np.random.default_rng([plan.seed, 0xF1EE7])
        self.timers: list[tuple[float, int, Any]] = []
        self._timer_seq = 0
        self.stopping = False
        self.counts = {"connects": 0, "disconnects": 0, "connect_refused": 0, "refused": 0, "drops": 0, "updates": 0}
        v0 = decode_frame(Path(plan.v0_path).read_bytes()).dense()
        self.objective = SimObjective(plan.objective, v0)
        self.versions: dict[int, dict[str, np.ndarray]] = {}
        self.version_loss: float | None = None
        self.mirror = GlobalMirror(plan.fleet, self._on_version)
        self.log = Path(plan.log_path).open("a", buffering=1)
        self.devices = [_Device(self, d) for d in plan.devices]
        self.clients = [SimClient(self, f"simfleet-{plan.fleet}-{plan.devices[0].index if plan.devices else 0}-{plan.seed}", None)]
        self.clients += [d.client for d in self.devices]

    def at(self, when: float, fn: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self.timers, (when, self._timer_seq, fn))

    def _on_version(self, version: int, state: dict[str, np.ndarray]) -> None:
        self.versions[version] = state
        for old in [v for v in self.versions if v < version - 64]:
            del self.versions[old]
        self.version_loss = self.objective.loss(state)
        for d in self.devices:
            d.on_new_version()

    def record(self, device: _Device, mid: int, nbytes: int, dense: int) -> None:
        """An update published: counted now, and logged when the broker acknowledges it (an
        update logged is one the broker took, which the federation must then never lose)."""
        self.counts["updates"] += 1
        line = {"t": round(time.time(), 4), "device": device.spec.id, "base": device.base, "bytes": nbytes, "dense": dense}
        device.client.unacked[mid] = json.dumps(line) + "\n"

    def _churn(self) -> None:
        c = self.plan.churn
        if c.drops_per_min > 0 and time.time() >= self.plan.start_at:
            p = c.drops_per_min / 60.0 * MISC_EVERY_S
            for d in self.devices:
                if d.down_until <= time.time() and d.client.connected and self.rng.random() < p:
                    d.drop(c.down_s * float(self.rng.uniform(0.5, 1.5)))
        self.at(time.time() + MISC_EVERY_S, self._churn)

    def _misc(self) -> None:
        for c in self.clients:
            if c.connected:
                c.mqtt.loop_misc()
        self.at(time.time() + MISC_EVERY_S, self._misc)

    def _heartbeat(self) -> None:
        for d in self.devices:
            d.publish_status()
        self.at(time.time() + self.plan.heartbeat_s, self._heartbeat)

    def run(self) -> dict[str, Any]:
        plan = self.plan
        t0 = time.time()
        # Connect at a bounded rate: a thousand simultaneous CONNECTs is a test of the
        # listen backlog, not of the fleet.
        gap = 1.0 / max(plan.connect_per_s, 1.0)
        for i, c in enumerate(self.clients):
            self.at(t0 + i * gap, c.connect)
        self.at(t0 + MISC_EVERY_S, self._misc)
        self.at(plan.start_at, self._churn)
        self.at(t0 + plan.heartbeat_s * float(self.rng.uniform(0.5, 1.0)), self._heartbeat)
        while not self.stopping and time.time() < plan.end_at:
            now = time.time()
            while self.timers and self.timers[0][0] <= now:
                _, _, fn = heapq.heappop(self.timers)
                fn()
            self._pump(min(0.05, max(0.0, (self.timers[0][0] - time.time()) if self.timers else 0.05)))
        return self.shutdown(time.time() - t0)

    def _pump(self, timeout: float) -> None:
        """Serve every connection whose socket is ready, waiting at most ``timeout``."""
        for key, mask in self.sel.select(timeout):
            client: SimClient = key.data
            if mask & selectors.EVENT_READ:
                client.mqtt.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.mqtt.loop_write()

    def shutdown(self, elapsed: float) -> dict[str, Any]:
        self.stopping = True
        for d in self.devices:
            if d.client.connected:
                d.client.mqtt.publish(protocol.device_status(self.plan.fleet, d.spec.id), d.status_payload("offline"), qos=1, retain=True)
        deadline = time.time() + 5.0
        while time.time() < deadline and any(c.connected and (c.mqtt.want_write() or c.unacked) for c in self.clients):
            self._pump(0.05)
        for c in self.clients:
            if c.connected:
                c.mqtt.disconnect()
                c.mqtt.loop_write()
        self.log.close()
        return {
            **self.counts,
            "devices": len(self.devices),
            "seconds": round(elapsed, 2),
            "final_version": self.mirror.version,
            "mirror_errors": self.mirror.errors,
            "bytes_up": sum(d.bytes_up for d in self.devices),
            "dense_bytes_up": sum(d.dense_bytes_up for d in self.devices),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run simulated fleet devices from a plan (see fedge_lab.simfleet).")
    parser.add_argument("plan", help="plan JSON written by the testbed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = Path(args.plan)
    plan = FleetPlan.from_json(path.read_text(), str(path))
    fleet = SimFleet(plan)

    def on_term(signum: int, frame: Any) -> None:
        fleet.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info("%d simulated devices, training from %s to %s", len(plan.devices), time.ctime(plan.start_at), time.ctime(plan.end_at))
    summary = fleet.run()
    path.with_suffix(".summary").write_text(json.dumps(summary, indent=1))
    log.info("stopped: %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
