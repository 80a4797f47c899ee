"""Helpers shared by the operator commands: where the state is, and how to reach the broker."""

from __future__ import annotations

import argparse
from typing import Any

from coordinator.errors import ConfigError


def add_state_args(p: Any) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="coordinator TOML config (its state_dir is read)")
    src.add_argument("--state-dir", help="coordinator state directory")


def state_dir(args: argparse.Namespace) -> str:
    if args.config:
        from coordinator.config import load_config

        return load_config(args.config).state_dir
    return str(args.state_dir)


def add_broker_args(p: Any) -> None:
    p.add_argument("--config", help="coordinator TOML config (broker and fleet are read from it)")
    p.add_argument("--host", help="broker host (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="broker port (default: the config's, else 1883)")
    p.add_argument("--fleet", help="fleet id (default: the config's, else 'default')")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password")


def broker_target(args: argparse.Namespace) -> tuple[str, int, str, str | None, str | None]:
    """``(host, port, fleet, username, password)`` from the flags, falling back to the config."""
    host, port, fleet, user, password = "127.0.0.1", 1883, "default", None, None
    if args.config:
        from coordinator.config import load_config

        cfg = load_config(args.config)
        host, port, fleet, user, password = cfg.broker.host, cfg.broker.port, cfg.fleet, cfg.broker.username, cfg.broker.password
    host = args.host or host
    port = args.port or port
    fleet = args.fleet or fleet
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    return host, port, fleet, args.username or user, args.password or password
