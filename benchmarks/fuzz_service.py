"""Hostile messages against a live coordinator and a live agent, through a real Mosquitto.

    python -m benchmarks.fuzz_service [--messages 10000] [--seed 0] [--json]

A secured coordinator (production defaults: enrolled devices only, signatures required,
adaptive norm bound) and a paused tiny-model agent that follows it. The fuzzer publishes
random bytes, truncated and bit-flipped envelopes, zstd bombs, forged and replayed
updates, oversize and non-finite updates and abusive sample counts to the update topics,
and forged, unsigned, truncated and bomb global state, acks and commands to the agent.

It reports ``crashes`` (a daemon that exited or logged a traceback), ``state_changes``
(global versions or accepted updates caused by hostile messages), ``valid_applied`` (the
valid updates among them, applied with a capped weight: the abusive sample counts and the
first copy of the replayed update), ``unaccounted`` (update messages neither applied nor
counted by a reason, duplicates included) and ``peak_rss_mb`` of each daemon, against a
quiet run of the same length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from compression import FrameKind, compress_dense, decode_frame, encode_frame, protocol, state_digest
from compression.frame import SparseTensor
from compression.mqtt import loopback, make_client
from compression.protocol import GlobalMeta
from coordinator.enrolment import enroll
from coordinator.store import Store
from fedge_lab.broker import MosquittoBroker
from fedge_lab.corpus import write_device_corpus
from fedge_lab.demo import build_tiny_model, serve_argv, write_toml
from fedge_lab.processes import Child

FLEET = "fuzz"
DEVICE = "dev-a"


def _envelope(seq: int, frame: bytes, key: Ed25519PrivateKey | None, *, base: int, samples: int = 4, device: str = DEVICE) -> bytes:
    head = json.dumps(
        {
            "base_version": base,
            "device": device,
            "frame_sha256": hashlib.sha256(frame).hexdigest(),
            "num_samples": samples,
            "seq": seq,
            "timestamp": time.time(),
            "train_loss": None,
            "update_id": f"{device}-{seq}-{uuid.uuid4().hex[:8]}",
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    if key is None:
        return b"FEV1" + struct.pack("<I", len(head)) + head + frame
    sig = key.sign(b"fedge update v1\x00" + head)
    return b"FEV2" + struct.pack("<I", len(head)) + head + bytes([len(sig)]) + sig + frame


def _frame_with_body(body: bytes, declared: int | None = None) -> bytes:
    z = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(body)
    if declared is not None:  # a zstd header that lies about the content size
        fhd = z[4]
        fcs_len = {0: 1, 1: 2, 2: 4, 3: 8}[fhd >> 6]
        z = z[:4] + bytes([(fhd & 0x3F) | 0xC0]) + declared.to_bytes(8, "little") + z[5 + fcs_len :]
    header = struct.pack("<4sBBHII", b"FEDG", 2, 1, 0, len(body), len(z))
    return header + z + struct.pack("<I", zlib.crc32(z, zlib.crc32(header)))


def _non_finite(frame: bytes) -> bytes:
    body = bytearray(zstandard.ZstdDecompressor().decompress(frame[16:-4]))
    one = struct.pack("<f", 0.01)
    i = bytes(body).rfind(one)
    body[i : i + 4] = struct.pack("<f", float("nan"))
    return _frame_with_body(bytes(body))


class Publisher:
    def __init__(self, port: int) -> None:
        self.codes: Counter[str] = Counter()
        self.c = make_client(loopback(port), f"fuzzer-{uuid.uuid4().hex[:6]}")
        self.c.max_inflight_messages_set(200)
        self.messages: list[tuple[str, bytes]] = []
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.c.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _sampler(pids: dict[str, int], peaks: dict[str, float], stop: threading.Event) -> None:
    procs = {k: psutil.Process(p) for k, p in pids.items()}
    while not stop.is_set():
        for k, p in procs.items():
            try:
                peaks[k] = max(peaks.get(k, 0.0), p.memory_info().rss / 2**20)
            except psutil.Error:
                pass
        stop.wait(0.05)


def _coord_counts(state: Path) -> tuple[int, int, int]:
    store = Store(state, readonly=True)
    try:
        c = store.counts()
        return c["versions"], c["accepted"], c["rejected"]
    finally:
        store.close()


def _coordinator_status(pub: Publisher) -> dict:
    for t, p in reversed(pub.messages):
        if t == protocol.coordinator_status(FLEET):
            return json.loads(p)
    return {}


def run(messages: int, seed: int, work: Path, console: Console) -> dict:
    rng = np.random.default_rng(seed)
    model = build_tiny_model(work)
    state = work / "coord" / "state"
    report = enroll(state, DEVICE, work / DEVICE, fleet=FLEET, broker_host="127.0.0.1", broker_port=1)
    key = serialization.load_pem_private_key((work / DEVICE / f"{DEVICE}.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    broker = MosquittoBroker(work / "broker", persistence=True).start()
    coord_cfg = write_toml(
        work / "coord" / "coordinator.toml",
        {"fleet": FLEET, "state_dir": "state", "heartbeat_s": 1.0, "broker": {"port": broker.port}, "model": {"source": model}},
    )
    write_device_corpus(work / "agent" / "data", 0)
    agent_cfg = write_toml(
        work / "agent" / "agent.toml",
        {
            "device_id": "victim",
            "fleet": FLEET,
            "data_dir": "data",
            "state_dir": "state",
            "heartbeat_s": 1.0,
            "fleet_public_key": report["fleet_public_key"],
            "broker": {"port": broker.port},
            "model": {"source": model, "quantize": "int8"},
            "train": {"threads": 1, "batch_size": 2, "seq_len": 32, "local_steps": 1, "eval_blocks": 2},
        },
    )
    coord = Child("coordinator", serve_argv(coord_cfg), work / "coordinator.log").start()
    agent = Child("agent", [sys.executable, "-m", "edge_agent", "run", "--config", str(agent_cfg)], work / "agent.log").start()
    pub = Publisher(broker.port)
    try:
        pub.c.subscribe([(protocol.coordinator_status(FLEET), 1), (protocol.global_meta(FLEET), 1), (protocol.global_snapshot(FLEET), 1)])
        pub.publish(protocol.device_cmd(FLEET, "victim"), protocol.encode_command("pause")).wait_for_publish(10)
        deadline = time.monotonic() + 180
        status_path = work / "agent" / "state" / "status.json"
        while time.monotonic() < deadline:
            doc = json.loads(status_path.read_text()) if status_path.exists() else {}
            if doc.get("state") == "paused" and doc.get("version") is not None:
                break
            pub.publish(protocol.device_cmd(FLEET, "victim"), protocol.encode_command("pause"))
            time.sleep(1.0)
        else:
            raise RuntimeError("the agent did not come up paused on version 0")
        metas = [GlobalMeta.from_json(p) for t, p in pub.messages if t.endswith("/meta")]
        snaps = {hashlib.sha256(p).hexdigest(): p for t, p in pub.messages if t.endswith("/snapshot")}
        meta = metas[-1]
        g = decode_frame(snaps[meta.snapshot_sha256]).dense()
        pids = {"coordinator": coord.proc.pid, "agent": agent.proc.pid}  # type: ignore[union-attr]

        def measure(seconds: float) -> dict[str, float]:
            peaks: dict[str, float] = {}
            stop = threading.Event()
            t = threading.Thread(target=_sampler, args=(pids, peaks, stop), daemon=True)
            t.start()
            time.sleep(seconds)
            stop.set()
            t.join()
            return peaks

        quiet = measure(5.0)
        before = _coord_counts(state)
        dup_before = int(_coordinator_status(pub).get("duplicates", 0))
        good = encode_frame(FrameKind.UPDATE, {k: SparseTensor(v.shape, np.full(v.size, 0.01, np.float32)) for k, v in g.items()})
        replay = _envelope(1, good, key, base=0)
        real_bomb = _frame_with_body(b"\0" * (200 << 20))
        fake = {k: np.full_like(v, 3.0) for k, v in g.items()}
        fake_snap = compress_dense(fake, FrameKind.SNAPSHOT)
        fake_meta = GlobalMeta(
            999, hashlib.sha256(fake_snap).hexdigest(), len(fake_snap), time.time(), state_digest(fake), model=meta.model
        )
        wrong = Ed25519PrivateKey.generate()
        update_topic = protocol.device_update(FLEET, DEVICE)
        kinds: Counter[str] = Counter()
        sent_updates = abuse = 0
        peaks: dict[str, float] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(pids, peaks, stop), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        infos = []
        seq = 1000
        for i in range(messages):
            to_agent = i % 5 == 4
            if to_agent:
                kind = ["meta_random", "meta_unsigned", "meta_forged", "snapshot_fake", "delta_bomb", "ack_forged", "cmd_junk"][
                    int(rng.integers(7))
                ]
                if kind == "meta_random":
                    topic, payload = protocol.global_meta(FLEET), bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))
                elif kind == "meta_unsigned":
                    topic, payload = protocol.global_meta(FLEET), fake_meta.to_json()
                elif kind == "meta_forged":
                    topic, payload = protocol.global_meta(FLEET), fake_meta.signed(wrong.sign).to_json()
                elif kind == "snapshot_fake":
                    topic, payload = protocol.global_snapshot(FLEET), fake_snap
                elif kind == "delta_bomb":
                    topic, payload = protocol.global_delta(FLEET), _frame_with_body(b"\0" * 1000, declared=1 << 36)
                elif kind == "ack_forged":
                    ack = protocol.UpdateAck("victim", 1, "victim-1-x", "applied").signed(wrong.sign)
                    topic, payload = protocol.device_ack(FLEET, "victim"), ack.to_json()
                else:
                    topic, payload = protocol.device_cmd(FLEET, "victim"), bytes(rng.integers(0, 256, 20, dtype=np.uint8))
                kinds[kind] += 1
                infos.append(pub.publish(topic, payload))
                continue
            kind = [
                "random", "truncated", "bitflip", "bomb_lying", "bomb_real", "forged", "replayed", "unsigned",
                "oversize", "non_finite", "stranger", "bad_topic", "sample_abuse",
            ][int(rng.integers(13))]  # fmt: skip
            seq += 1
            if kind == "random":
                payload = bytes(rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8))
            elif kind == "truncated":
                env = _envelope(seq, good, key, base=0)
                payload = env[: int(rng.integers(0, len(env)))]
            elif kind == "bitflip":
                b = bytearray(_envelope(seq, good, key, base=0))
                for _ in range(int(rng.integers(1, 4))):
                    b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
                payload = bytes(b)
            elif kind == "bomb_lying":
                payload = _envelope(seq, _frame_with_body(b"\0" * 1000, declared=1 << 36), key, base=0)
            elif kind == "bomb_real":
                payload = _envelope(seq, real_bomb, key, base=0)
            elif kind == "forged":
                payload = _envelope(seq, good, wrong, base=0)
            elif kind == "replayed":
                payload = replay
            elif kind == "unsigned":
                payload = _envelope(seq, good, None, base=0)
            elif kind == "oversize":
                payload = _envelope(seq, bytes(17 << 20), key, base=0) if kinds["oversize"] < 10 else b"FEV2" + bytes(200)
            elif kind == "non_finite":
                payload = _envelope(seq, _non_finite(good), key, base=0)
            elif kind == "stranger":
                payload = _envelope(seq, good, wrong, base=0, device="stranger")
            elif kind == "sample_abuse":
                if abuse >= 20:
                    payload = _envelope(seq, good, wrong, base=0, samples=10**12)
                else:
                    abuse += 1
                    payload = _envelope(seq, good, key, base=0, samples=10**12)
            else:
                payload = _envelope(seq, good, key, base=0)
            topic = (
                protocol.device_update(FLEET, "stranger")
                if kind == "stranger"
                else "fl/fuzz/devices/not a device!/update"
                if kind == "bad_topic"
                else update_topic
            )
            kinds[kind] += 1
            sent_updates += 1
            infos.append(pub.publish(topic, payload))
        for info in infos:
            info.wait_for_publish(60)
        sent_s = time.monotonic() - t0
        # Barrier: every update message processed (counted by a reason, confirmed as a duplicate, or applied).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            versions, accepted, rejected = _coord_counts(state)
            dups = int(_coordinator_status(pub).get("duplicates", 0)) - dup_before
            handled = (accepted - before[1]) + (rejected - before[2]) + dups
            if handled >= sent_updates:
                break
            time.sleep(0.5)
        time.sleep(2.0)  # the agent's heartbeat after its last refusal
        stop.set()
        sampler.join()
        versions, accepted, rejected = _coord_counts(state)
        dups = int(_coordinator_status(pub).get("duplicates", 0)) - dup_before
        agent_doc = json.loads(status_path.read_text())
        store = Store(state, readonly=True)
        try:
            applied = [e for e in store.ledger() if e["applied_version"] > before[0] - 1]
            by_reason = store.rejection_counts()
        finally:
            store.close()
        crashes = sum(1 for c in (coord, agent) if c.returncode is not None)
        crashes += sum("Traceback" in (work / f"{n}.log").read_text() for n in ("coordinator", "agent"))
        capped = all(e["num_samples"] <= 100_000 for e in applied)
        hostile_changes = (versions - before[0]) - len(applied) + sum(1 for e in applied if e["device"] != DEVICE)
        agent_msgs = sum(v for k, v in kinds.items() if k in ("meta_random", "meta_unsigned", "meta_forged", "ack_forged", "cmd_junk"))
        return {
            "messages": messages,
            "update_messages": sent_updates,
            "agent_messages": messages - sent_updates,
            "send_s": round(sent_s, 1),
            "crashes": crashes,
            "state_changes": max(0, hostile_changes),
            "valid_applied": len(applied),
            "valid_capped": capped,
            "unaccounted": sent_updates - ((accepted - before[1]) + (rejected - before[2]) + dups),
            "duplicates": dups,
            "rejections": by_reason,
            "agent_refused": int(agent_doc.get("metrics", {}).get("messages_refused", 0)),
            "agent_refusable": agent_msgs,
            "agent_version": agent_doc.get("version"),
            "peak_rss_mb": {k: round(v, 1) for k, v in peaks.items()},
            "quiet_rss_mb": {k: round(v, 1) for k, v in quiet.items()},
            "rss_ratio": {k: round(peaks[k] / quiet[k], 2) for k in peaks if quiet.get(k)},
            "kinds": dict(kinds),
        }
    finally:
        pub.close()
        agent.stop()
        coord.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    console = Console(stderr=args.json)
    with tempfile.TemporaryDirectory(prefix="fedge-fuzz-") as tmp:
        result = run(args.messages, args.seed, Path(tmp), console)
    table = Table(title=f"fuzz_service: {result['messages']} hostile messages")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k in (
        "crashes",
        "state_changes",
        "unaccounted",
        "duplicates",
        "valid_applied",
        "agent_refused",
        "agent_refusable",
        "send_s",
    ):
        table.add_row(k, str(result[k]))
    for k, v in result["peak_rss_mb"].items():
        table.add_row(f"peak RSS {k} (quiet)", f"{v} MB ({result['quiet_rss_mb'].get(k)} MB, x{result['rss_ratio'].get(k)})")
    console.print(table)
    console.print("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(result["rejections"].items())))
    if args.json:
        print(json.dumps(result))
    ok = result["crashes"] == 0 and result["state_changes"] == 0 and result["unaccounted"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
