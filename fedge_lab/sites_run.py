"""A bounded lab run of a federation of sites, with simulated and real devices at each site.

    fedge-coordinator testbed-sites --sites 3 --sim-per-site 200 --agents-per-site 1 --duration 120 [--json]

It starts :class:`fedge_lab.sites.SiteLab` (a root broker, the bridged site brokers, the root
and the site aggregators), ``--sim-per-site`` simulated devices per site, and
``--agents-per-site`` real ``fedge-agent`` processes per site on the tiny model, each
enrolled-style with the root's key for versions and its site's key for acks. It prints the
tiers' progress while it runs, then a report: the root's versions, each site's partials,
and whether every update the sites acknowledged reached the root exactly once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from compression import CodecConfig
from coordinator.cli.testbed import add_sites_arguments
from coordinator.identity import public_hex
from coordinator.site import load_signing_key
from fedge_lab.corpus import write_device_corpus
from fedge_lab.demo import MODEL_TRAIN, build_model_cache, build_tiny_model, write_toml
from fedge_lab.processes import Child
from fedge_lab.scoring import write_sim_model
from fedge_lab.sites import SiteLab, wait_until


def start_agents(lab: SiteLab, per_site: int, run: Path, console: Console) -> list[Child]:
    """``per_site`` real agents at every site, as processes (``python -m edge_agent run``)."""
    if per_site <= 0:
        return []
    console.print("building the int8 model cache once for all real agents ...")
    cache = build_model_cache(lab.source, run)
    children = []
    for s, node in enumerate(lab.nodes):
        site_key = public_hex(load_signing_key(str(lab.work / node.name / "secrets" / f"{node.name}.key")))
        for k in range(per_site):
            device = f"{node.name}-agent{k + 1:02d}"
            root = run / "agents" / device
            write_device_corpus(root / "data", s * per_site + k)
            cfg = write_toml(
                root / "agent.toml",
                {
                    "device_id": device,
                    "fleet": lab.fleet,
                    "profile": "laptop",
                    "data_dir": "data",
                    "state_dir": "state",
                    "heartbeat_s": 2.0,
                    "sync_wait_s": 10.0,
                    "fleet_public_key": lab.fleet_public,
                    "site_public_key": site_key,
                    "broker": {"host": "127.0.0.1", "port": node.broker.port},
                    "model": {"source": lab.source, "quantize": "int8", "cache_dir": str(cache)},
                    "train": {**MODEL_TRAIN["tiny"], "seed": s * per_site + k},
                    "schedule": {"min_free_memory_mb": 0, "max_load_per_cpu": 0.0, "require_ac_power": False},
                    "codec": asdict(CodecConfig()),
                },
            )
            argv = [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)]
            children.append(Child(device, argv, run / "logs" / f"{device}.log").start())
    return children


def report(lab: SiteLab) -> dict[str, Any]:
    """The tiers' records at the end: versions, partials, and the exactly-once check."""
    root_covered = lab.root_covered()
    sites = {}
    for i, node in enumerate(lab.nodes):
        p = lab.site_partials(i)
        forwarded = lab.site_covered(i)
        mine = {u: pid for u, pid in root_covered.items() if pid.startswith(f"{node.name}-")}
        sites[node.name] = {
            "updates_forwarded": len(forwarded),
            "updates_at_root": len(mine),
            "partials_unacked": p["unacked"],
            "buffered": p["buffered"],
            "agree": mine == forwarded,
        }
    return {
        "root_version": lab.root_version(),
        "device_updates_at_root": len(root_covered),
        "sites": sites,
        "exactly_once": all(s["agree"] for s in sites.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedge_lab.sites_run", description=__doc__.split("\n\n")[0])
    add_sites_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from coordinator.errors import ConfigError

    if not 2 <= args.sites <= 4:
        raise ConfigError(f"--sites must be 2..4, got {args.sites}")
    if args.duration <= 0 or args.step_s <= 0 or args.sim_per_site < 0 or args.agents_per_site < 0:
        raise ConfigError("--duration and --step-s must be positive; device counts must not be negative")
    console = Console(stderr=args.json)
    run = Path(args.run_dir or tempfile.mkdtemp(prefix="fedge-sites-lab-")).resolve()
    if args.agents_per_site:
        console.print("building the tiny model ...")
        source = build_tiny_model(run)
    else:
        source = str(write_sim_model(run / "sim-model", 256, 4))
    lab = SiteLab(run / "lab", args.sites, source=source)
    agents: list[Child] = []
    console.print(f"run directory: {run}")
    try:
        lab.start()
        wait_until(lambda: lab.root_version() >= 0 and all((n.state_dir / "coordinator.db").exists() for n in lab.nodes), 120, "the tiers")
        root_port = lab.root_broker.port if lab.root_broker else "?"
        console.print(f"root broker 127.0.0.1:{root_port}; sites: " + ", ".join(f"{n.name} 127.0.0.1:{n.broker.port}" for n in lab.nodes))
        if args.sim_per_site:
            lab.start_sim(args.sim_per_site, step_s=args.step_s)
        agents = start_agents(lab, args.agents_per_site, run, console)
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < args.duration:
            time.sleep(min(5.0, args.duration - elapsed))
            st = lab.status()
            line = "  ".join(f"{k}: {v['buffered']} buffered, {v['unacked']} unacked" for k, v in st["sites"].items())
            console.print(f"[{elapsed:5.0f}/{args.duration:.0f} s] root v{st['root_version']}  {line}")
        lab.stop_sims()
        for a in agents:
            a.stop()
        wait_until(
            lab.drained,
            120,
            "the sites to drain",
        )
        out = report(lab)
    finally:
        for a in agents:
            a.stop()
        lab.stop()
    for name, s in out["sites"].items():
        console.print(f"{name}: {s['updates_forwarded']} updates forwarded, {s['updates_at_root']} at the root, agree: {s['agree']}")
    console.print(f"root: v{out['root_version']}, {out['device_updates_at_root']} device updates; exactly once: {out['exactly_once']}")
    if args.json:
        print(json.dumps(out))
    return 0 if out["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
