"""Sites: what the root of a federation costs per device update, and how many it can take.

    python -m benchmarks.sites [--partials 40] [--updates-per-partial 1000] [--groups 2] [--root-buffer 4] [--json]

The root is ``fedge-coordinator serve`` as deployed, on a private Mosquitto, with the
trainable tensors of SmolLM2's LoRA (r = 8 on q,v; 460,800 values; the tiny model's when
SmolLM2 is absent) and FedBuff making one version every ``--root-buffer`` groups.

- **Fed with synthetic partials** (:mod:`compression.partial`), signed by an enrolled site
  key, as a site aggregator forwards them. Each partial covers ``--updates-per-partial`` device
  updates in ``--groups`` groups by base version, each group a lossless fp32 weighted sum.
  They are published as fast as the broker takes them. Measured: the partials/s committed
  and acknowledged, from the first publish to the last ack; the device updates/s that makes
  (``root_capacity_updates_per_s``); and the root's CPU per device update.
- **Against a single coordinator** fed device updates directly: 1,000 simulated devices flood
  the same kind of process with default-codec updates (``benchmarks.coordinator_throughput``'s
  fleet). Measured: updates/s and CPU per update.

The root's cost per device update falls with the site's buffer: a partial costs about the
same whether it covers 10 updates or 1,000.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from rich.console import Console
from rich.table import Table

from benchmarks.coordinator_throughput import FLEET, Fleet, _ledger
from benchmarks.sites_fleet import fleet_run, fleet_table
from compression import CodecConfig, FrameKind, compress_dense, compress_update, protocol
from compression.mqtt import loopback, make_client
from compression.partial import Group, Partial
from coordinator.config import ModelSpecConfig
from coordinator.initial import initial_state
from coordinator.store import Store
from fedge_lab.broker import MosquittoBroker
from fedge_lab.demo import LAB_LIMITS, serve_argv, write_toml
from fedge_lab.processes import Child


def _source(model: str, work: Path, console: Console) -> tuple[str, str]:
    from benchmarks.fedsim import smollm2_available

    if model == "smollm2" or (model == "auto" and smollm2_available()):
        return "smollm2", "smollm2"
    from edge_agent.tiny import build_tiny_model
    from fedge_lab.corpus import pydoc_domains

    console.print("[yellow]SmolLM2 is not installed: LoRA shapes of the tiny model[/]")
    texts = [t for topics in pydoc_domains().values() for t in list(topics.values())[:8]]
    return str(build_tiny_model(work / "tiny", texts)), "tiny"


def _start(work: Path, name: str, broker: MosquittoBroker, source: str, limits: dict[str, Any], buffer_size: int) -> Child:
    cfg = write_toml(
        work / f"{name}.toml",
        {
            "fleet": FLEET,
            "state_dir": f"{name}-state",
            "limits": limits,
            "heartbeat_s": 5.0,
            "broker": {"port": broker.port},
            "model": {"source": source, "lora_r": 8, "lora_alpha": 16},
            "strategy": {"kind": "fedbuff", "buffer_size": buffer_size, "max_staleness": 1_000_000},
        },
    )
    return Child(name, serve_argv(cfg), work / f"{name}.log").start()


def root_capacity(args: argparse.Namespace, work: Path, source: str, v0: dict[str, np.ndarray], console: Console) -> dict[str, Any]:
    """The root fed with synthetic partials: partials/s, device updates/s, CPU per device update."""
    key = Ed25519PrivateKey.generate()
    store = Store(work / "root-state", create=True)
    store.enroll("site-bench", key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    store.close()
    rng = np.random.default_rng(0)
    per_group = args.updates_per_partial // args.groups
    frames = [
        compress_dense({k: (rng.normal(0, 1e-3, v.shape) * per_group).astype(np.float32) for k, v in v0.items()}, FrameKind.UPDATE)
        for _ in range(args.groups)
    ]
    partials = []
    for s in range(1, args.partials + 1):
        groups = tuple(
            Group(0, 8.0 * per_group, per_group, tuple(f"d{s}-{g}-{u}" for u in range(per_group)), frames[g]) for g in range(args.groups)
        )
        partials.append(Partial("site-bench", s, time.time(), groups).encode(key.sign))
    console.print(
        f"root: {args.partials} partials of {args.groups * per_group} device updates, {np.mean([len(p) for p in partials]):,.0f} B each"
    )
    broker = MosquittoBroker(work / "root-broker").start()
    root = _start(work, "root", broker, source, {}, args.root_buffer)
    acks: queue.Queue[bytes] = queue.Queue()
    site = make_client(loopback(broker.port), "site-bench-up")
    site.on_connect = lambda c, u, f, r, p: c.subscribe(protocol.site_ack(FLEET, "site-bench"), qos=1)
    site.on_message = lambda c, u, m: acks.put(bytes(m.payload))
    site.connect("127.0.0.1", broker.port)
    site.loop_start()
    try:
        _wait_meta(broker.port)
        proc = psutil.Process(root.proc.pid)  # type: ignore[union-attr]
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        infos = [site.publish(protocol.site_partial(FLEET, "site-bench"), p, qos=1) for p in partials]
        for info in infos:
            info.wait_for_publish(timeout=120)
        got = 0
        deadline = time.monotonic() + 600
        while got < args.partials and time.monotonic() < deadline:
            try:
                payload = acks.get(timeout=1.0)
            except queue.Empty:
                continue
            got += b'"applied"' in payload
        elapsed = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        if got < args.partials:
            raise SystemExit(f"only {got} of {args.partials} partials were acknowledged; see {work / 'root.log'}")
        rss = proc.memory_info().rss / 1e6
    finally:
        site.disconnect()
        site.loop_stop()
        root.stop()
        broker.stop()
    updates = args.partials * args.groups * per_group
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "partials": args.partials,
        "updates_per_partial": args.groups * per_group,
        "partial_bytes": int(np.mean([len(p) for p in partials])),
        "seconds": elapsed,
        "partials_per_s": args.partials / elapsed,
        "root_capacity_updates_per_s": updates / elapsed,
        "root_cpu_ms_per_partial": 1000 * cpu / args.partials,
        "root_cpu_us_per_device_update": 1e6 * cpu / updates,
        "root_rss_mb": rss,
    }


def single_coordinator(args: argparse.Namespace, work: Path, source: str, v0: dict[str, np.ndarray], console: Console) -> dict[str, Any]:
    """One coordinator fed device updates directly (1,000 simulated devices, flood)."""
    rng = np.random.default_rng(1)
    frames = [
        compress_update({k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in v0.items()}, CodecConfig()).frame for _ in range(16)
    ]
    broker = MosquittoBroker(work / "single-broker").start()
    coordinator = _start(work, "single", broker, source, LAB_LIMITS, 20)
    fleet = None
    try:
        _wait_meta(broker.port)
        fleet = Fleet(broker.port, frames)
        devices = [f"sim-{i:04d}" for i in range(1000)]
        fleet.announce(devices)
        proc = psutil.Process(coordinator.proc.pid)  # type: ignore[union-attr]
        cpu0 = proc.cpu_times()
        t_first = fleet.send(devices, args.device_updates)
        deadline = time.monotonic() + 600
        while len(ledger := _ledger(work / "single-state")) < args.device_updates and time.monotonic() < deadline:
            time.sleep(0.5)
        cpu1 = proc.cpu_times()
        if len(ledger) < args.device_updates:
            raise SystemExit(f"only {len(ledger)} of {args.device_updates} updates were applied; see {work / 'single.log'}")
        seconds = max(e["received"] for e in ledger) - t_first
    finally:
        if fleet is not None:
            fleet.close()
        coordinator.stop()
        broker.stop()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    console.print(f"single coordinator: {args.device_updates / seconds:.0f} device updates/s")
    return {
        "updates": args.device_updates,
        "updates_per_s": args.device_updates / seconds,
        "cpu_us_per_update": 1e6 * cpu / args.device_updates,
    }


def _wait_meta(port: int, timeout: float = 120.0) -> None:
    """Until the coordinator has published its first version (it is serving)."""
    seen: queue.Queue[bytes] = queue.Queue()
    c = make_client(loopback(port), "bench-wait")
    c.on_connect = lambda cl, u, f, r, p: cl.subscribe(protocol.global_meta(FLEET), qos=1)
    c.on_message = lambda cl, u, m: seen.put(bytes(m.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        seen.get(timeout=timeout)
    except queue.Empty:
        raise SystemExit("the coordinator published no version") from None
    finally:
        c.disconnect()
        c.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sites", description=__doc__.split("\n\n")[0])
    parser.add_argument("--partials", type=int, default=40)
    parser.add_argument("--updates-per-partial", type=int, default=1000, help="device updates a site's partial covers (its buffer)")
    parser.add_argument("--groups", type=int, default=2, help="base versions per partial")
    parser.add_argument("--root-buffer", type=int, default=4, help="the root's FedBuff K, in groups (one version per K groups)")
    parser.add_argument("--device-updates", type=int, default=2000, help="updates sent to the single coordinator")
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--fleet-devices", type=int, default=10_000, help="simulated devices in the fleet run through sites (0 = skip it)")
    parser.add_argument("--sites", type=int, default=4, help="sites in the fleet run (2..4 in the lab)")
    parser.add_argument("--step-s", type=float, default=60.0, help="seconds between a simulated device's updates")
    parser.add_argument("--fleet-seconds", type=float, default=300.0, help="how long the fleet run trains")
    parser.add_argument("--target-loss", type=float, default=0.5, help="the objective's loss the time to target is measured to (1.0 at v0)")
    parser.add_argument("--sim-processes", type=int, default=2, help="simulated-fleet processes per site")
    parser.add_argument("--sim-hidden", type=int, default=256, help="hidden size of the simulated model (LoRA r = 8 on q,v of 4 layers)")
    parser.add_argument("--root-groups", type=int, default=0, help="the root's FedBuff K in the fleet run, in groups (0 = 4 per site)")
    parser.add_argument("--partial-every-s", type=float, default=5.0, help="how often a site forwards a partial")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.updates_per_partial < args.groups:
        parser.error("--updates-per-partial must be at least --groups")
    console = Console(stderr=args.json, width=130)
    work = Path(tempfile.mkdtemp(prefix="fedge-sites-"))
    t0 = time.monotonic()
    source, model = _source(args.model, work, console)
    _, v0 = initial_state(ModelSpecConfig(source=source, lora_r=8, lora_alpha=16))
    fleet = fleet_run(args, work, console) if args.fleet_devices else None
    root = root_capacity(args, work, source, v0, console)
    single = single_coordinator(args, work, source, v0, console)
    table = Table(title=f"the root against a single coordinator ({model}, {sum(v.size for v in v0.values()):,} trainable values)")
    for col in ("", "messages/s", "device updates/s", "CPU per device update"):
        table.add_column(col, justify="right")
    table.add_row(
        f"root, partials of {root['updates_per_partial']}",
        f"{root['partials_per_s']:.1f}",
        f"{root['root_capacity_updates_per_s']:,.0f}",
        f"{root['root_cpu_us_per_device_update']:.0f} µs",
    )
    table.add_row(
        "single coordinator, device updates",
        f"{single['updates_per_s']:.0f}",
        f"{single['updates_per_s']:,.0f}",
        f"{single['cpu_us_per_update']:.0f} µs",
    )
    console.print(table)
    if fleet is not None:
        console.print(fleet_table(fleet))
    out = {
        "devices": fleet["devices"] if fleet else 0,
        "fleet": fleet,
        "model": model,
        "root": root,
        "single": single,
        "root_capacity_updates_per_s": root["root_capacity_updates_per_s"],
        "root_cpu_ratio_vs_single": root["root_cpu_us_per_device_update"] / single["cpu_us_per_update"],
        "seconds": time.monotonic() - t0,
    }
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
