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
