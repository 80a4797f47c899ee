"""A fleet run through sites: ``--fleet-devices`` simulated devices across ``--sites`` bridged sites.

Part of ``python -m benchmarks.sites`` (``--fleet-devices 0`` skips it). The topology is
:class:`fedge_lab.sites.SiteLab`: a root broker, one Mosquitto per site bridged to it with
the shipped bridge config, the root coordinator (FedBuff over groups, K = ``--root-groups``,
by default 4 per site: a version then covers about four partials of each site, some 20 s of
the fleet's work, so that a device's round spans a few versions; with K = 1 or K = sites,
a version per partial or so, dozens of versions step towards one base version's targets
during a device's round, and the loss overshoots and diverges), and a site aggregator per
site, all as processes. The devices are
``fedge_lab.simfleet`` processes, each device its own MQTT connection to its site's broker,
sending default-codec updates of the simulated objective (:mod:`fedge_lab.objective`) every
``--step-s`` seconds.

Measured: the devices that took part, the root's loss curve on the objective (1.0 at
version 0) and the time to ``--target-loss``, the bytes devices sent their sites and the
bytes sites sent the root, and the CPU per device update of the root and of the site
aggregators (which do what a single coordinator does).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from coordinator.config import ModelSpecConfig
from coordinator.initial import initial_state
from coordinator.store import Store
from fedge_lab.objective import ObjectiveConfig, SimObjective
from fedge_lab.scoring import write_sim_model
from fedge_lab.sites import SiteLab, wait_until


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def _raise_fd_limit() -> None:
    """Thousands of connections per process: the soft limit on open files goes up to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fleet_run(args: Any, work: Path, console: Console) -> dict[str, Any]:
    _raise_fd_limit()
    per_site = args.fleet_devices // args.sites
    source = str(write_sim_model(work / "fleet-model", args.sim_hidden, 4))
    lab = SiteLab(
        work / "fleet",
        args.sites,
        source=source,
        lora_r=8,
        root_strategy={"kind": "fedbuff", "buffer_size": args.root_groups or 4 * args.sites, "max_staleness": 1_000_000},
        site_options={"partial_every_s": args.partial_every_s, "partial_max_updates": 10_000, "resend_s": 30.0},
        heartbeat_s=5.0,
    )
    _, v0 = initial_state(ModelSpecConfig(source=source, lora_r=8, lora_alpha=16))
    objective = SimObjective(ObjectiveConfig(), v0)
    console.print(
        f"fleet: {per_site * args.sites:,} devices across {args.sites} sites, {sum(v.size for v in v0.values()):,} trainable values, "
        f"an update every {args.step_s:g} s per device, for {args.fleet_seconds:g} s"
    )
    curve: list[dict[str, Any]] = []
    try:
        lab.start()
        wait_until(lambda: lab.root_version() >= 0 and all((n.state_dir / "coordinator.db").exists() for n in lab.nodes), 120, "the tiers")
        lab.start_sim(
            per_site, step_s=args.step_s, processes=args.sim_processes, sync_wait_s=args.step_s, heartbeat_s=30.0, connect_per_s=150.0
        )
        start_at = time.time() + 2.0
        procs = {"root": psutil.Process(lab.root.proc.pid)}  # type: ignore[union-attr]
        procs.update({n.name: psutil.Process(n.coordinator.proc.pid) for n in lab.nodes})  # type: ignore[union-attr]
        cpu0 = {k: _cpu(p) for k, p in procs.items()}
        u0 = _root_updates(lab)
        seen = -1
        deadline = start_at + args.fleet_seconds
        while time.time() < deadline:
            time.sleep(2.0)
            v = lab.root_version()
            if v == seen:
                continue
            seen = v
            store = Store(lab.root_state, readonly=True)
            try:
                state, _ = store.load_version(v)
            except Exception:  # noqa: BLE001 - a version pruned between the two reads: take the next one
                continue
            finally:
                store.close()
            point = {"t": round(time.time() - start_at, 1), "version": v, "loss": round(objective.loss(state), 4)}
            curve.append(point)
            console.print(f"  t={point['t']:6.1f} s  root v{v:<5d} loss {point['loss']:.4f}  {lab.status()['sites']}")
        cpu1 = {k: _cpu(p) for k, p in procs.items()}
        window = max(1, _root_updates(lab) - u0)
        lab.stop_sims()
        wait_until(lambda: all(lab.site_partials(i)["buffered"] == 0 for i in range(lab.n)), 120, "the sites to forward what they hold")
        time.sleep(3.0)
        totals = _totals(lab)
    finally:
        lab.stop()
    sims = [json.loads(p.read_text()) for p in (lab.work / "sim").glob("*.summary")]
    hit = next((p for p in curve if p["loss"] <= args.target_loss), None)
    root_cpu = cpu1["root"] - cpu0["root"]
    site_cpu = sum(cpu1[n.name] - cpu0[n.name] for n in lab.nodes)
    return {
        "devices": sum(s["devices"] for s in sims),
        "devices_that_sent": totals["devices_that_sent"],
        "sites": args.sites,
        "seconds": args.fleet_seconds,
        "step_s": args.step_s,
        "trainable_values": int(sum(v.size for v in v0.values())),
        "target_loss": args.target_loss,
        "time_to_target_s": None if hit is None else hit["t"],
        "curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "device_updates_at_root": totals["root_device_updates"],
        "root_versions": totals["root_versions"],
        "partials": totals["partials"],
        "bytes_device_to_site": sum(s["bytes_up"] for s in sims),
        "bytes_device_dense_fp32": sum(s["dense_bytes_up"] for s in sims),
        "bytes_site_to_root": totals["partial_bytes"],
        "device_updates_in_cpu_window": window,
        "root_cpu_us_per_device_update": 1e6 * root_cpu / window,
        "site_cpu_us_per_device_update": 1e6 * site_cpu / window,
        "mirror_errors": sum(s["mirror_errors"] for s in sims),
    }


def _totals(lab: SiteLab) -> dict[str, int]:
    with lab.db(lab.root_state) as db:
        partials, updates = db.execute("SELECT COUNT(*), COALESCE(SUM(updates), 0) FROM partials").fetchone()
        versions = db.execute("SELECT MAX(version) FROM versions").fetchone()[0]
    partial_bytes, devices = 0, 0
    for node in lab.nodes:
        with lab.db(node.state_dir) as db:
            partial_bytes += int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM site_partials").fetchone()[0])
            devices += int(db.execute("SELECT COUNT(DISTINCT device) FROM ledger").fetchone()[0])
    return {
        "partials": int(partials),
        "root_device_updates": int(updates),
        "root_versions": int(versions),
        "partial_bytes": partial_bytes,
        "devices_that_sent": devices,
    }


def _root_updates(lab: SiteLab) -> int:
    with lab.db(lab.root_state) as db:
        return int(db.execute("SELECT COALESCE(SUM(updates), 0) FROM partials").fetchone()[0])


def fleet_table(f: dict[str, Any]) -> Table:
    t = Table(title=f"{f['devices']:,} simulated devices through {f['sites']} sites, {f['seconds']:g} s")
    t.add_column("")
    t.add_column("", justify="right")
    ttt = "not reached" if f["time_to_target_s"] is None else f"{f['time_to_target_s']:.0f} s"
    curve = " ".join(f"{p['loss']:.2f}" for p in f["curve"][:: max(1, len(f["curve"]) // 12)])
    rows = [
        ("devices (that sent an update)", f"{f['devices']:,} ({f['devices_that_sent']:,})"),
        ("device updates at the root", f"{f['device_updates_at_root']:,} in {f['partials']:,} partials, {f['root_versions']} versions"),
        (f"time to loss {f['target_loss']:g}", ttt),
        ("loss curve (1.0 at v0)", curve),
        ("bytes devices -> sites", f"{f['bytes_device_to_site']:,} (dense fp32: {f['bytes_device_dense_fp32']:,})"),
        ("bytes sites -> root", f"{f['bytes_site_to_root']:,}"),
        ("root CPU per device update", f"{f['root_cpu_us_per_device_update']:.0f} µs"),
        ("site aggregators' CPU per device update", f"{f['site_cpu_us_per_device_update']:.0f} µs"),
    ]
    for r in rows:
        t.add_row(*r)
    return t
