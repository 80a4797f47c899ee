"""``fedge-coordinator acl --fleet NAME``: print the fleet's Mosquitto ACL."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("acl", help="print the Mosquitto ACL of a fleet (devices scoped to their own id and fleet)")
    p.add_argument("--fleet", required=True)
    p.add_argument("--site", action="append", default=[], help="at the root broker: add the lines of this site's bridge (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compression.protocol import ProtocolError
    from coordinator.broker_acl import render_acl
    from coordinator.errors import ConfigError

    try:
        sys.stdout.write(render_acl(args.fleet, tuple(args.site)))
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None
    return 0
