"""``fedge-coordinator testbed``: a lab run from a testbed TOML (see ``docs/testbed.md``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "testbed",
        help="run a private Mosquitto, the coordinator and a fleet of real and simulated agents for a bounded time",
    )
    p.add_argument("config", help="testbed TOML, e.g. devices/testbed/sim-1000.toml")
    p.add_argument("--duration", type=float, help="override duration_s")
    p.add_argument("--strategy", choices=["fedasync", "fedbuff", "fedavg"], help="override strategy.kind")
    p.add_argument("--run-dir", default=None, help="where logs, state and the report go (default runs/testbed-<time>)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line of stdout")
    p.set_defaults(func=run)
    q = sub.add_parser(
        "testbed-sites",
        help="a federation of sites on this machine: root and bridged site brokers, their aggregators, simulated and real devices",
    )
    add_sites_arguments(q)
    q.set_defaults(func=run_sites)


def run_sites(args: argparse.Namespace) -> int:
    from fedge_lab.sites_run import run

    return run(args)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from coordinator.errors import ConfigError
    from fedge_lab.lab import run_testbed
    from fedge_lab.testbed_config import load_testbed_config

    cfg = load_testbed_config(args.config)
    if args.duration is not None:
        if args.duration <= 0:
            raise ConfigError(f"--duration must be positive, got {args.duration}")
        cfg = replace(cfg, duration_s=args.duration)
    if args.strategy:
        cfg = replace(cfg, strategy=replace(cfg.strategy, kind=args.strategy))
    run_dir = Path(args.run_dir or f"runs/testbed-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    return run_testbed(cfg, run_dir, args.json)


def add_sites_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, default=2, help="site brokers bridged to the root (2..4)")
    parser.add_argument("--sim-per-site", type=int, default=100, help="simulated devices at each site")
    parser.add_argument("--agents-per-site", type=int, default=0, help="real agents (tiny model) at each site")
    parser.add_argument("--step-s", type=float, default=5.0, help="seconds between a simulated device's updates")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds the devices train")
    parser.add_argument("--run-dir", help="where logs and state go (default: a new temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line of stdout")
